//! Events: the domain side of `dom.v1.Event`, and its one conversion to and from protobuf.
//!
//! The journal keeps the exact bytes the leader proposed, so decoding is only ever needed to
//! apply or to show an event; an older binary that meets a newer event kind refuses it clearly
//! instead of guessing.

use std::collections::BTreeMap;

use dom_proto::v1 as pb;
use prost::Message;
use thiserror::Error;

use crate::image::Trigger;

/// A blake3 digest.
pub type Hash = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub actor: String,
    pub time_unix_ms: i64,
    pub reason: String,
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    ImageAdded {
        name: String,
        root_hash: Hash,
        files: u64,
        bytes: u64,
        /// The manifest object; `None` only in events written before manifests existed.
        manifest_hash: Option<Hash>,
        filter: Vec<String>,
        triggers: Vec<Trigger>,
    },
    ImageDeleted {
        name: String,
    },
    MachineAdded {
        hostname: String,
        tags: BTreeMap<String, String>,
        required_image: Option<String>,
        planned_image: Option<String>,
    },
    MachineUpdated {
        hostname: String,
        tags: BTreeMap<String, String>,
    },
    MachineRemoved {
        hostname: String,
    },
    RequiredImageSet {
        hostnames: Vec<String>,
        image: Option<String>,
    },
    PlannedImageSet {
        hostnames: Vec<String>,
        image: Option<String>,
    },
    UpdatesHalted,
    UpdatesResumed,
    /// Machine changes applied together or not at all, in order.
    Batch(Vec<Change>),
    PolicySet(PolicyChange),
    /// Holds the machine's updates for `duration_ms` from the event's time (0 ends a pause).
    MachinePaused {
        hostname: String,
        duration_ms: u64,
    },
    /// Lets the machine take an unsafe update (one deleting most of its files) to `image`.
    SafetyCleared {
        hostname: String,
        image: String,
    },
}

/// New rollout limits; `None` keeps the current value, `Some(0)` removes the limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyChange {
    pub max_updating: Option<u64>,
    pub max_updating_percent: Option<u32>,
    pub max_high_impact: Option<u64>,
    pub fetch_bytes_per_sec: Option<u64>,
    pub brake_failure_percent: Option<u32>,
}

impl Change {
    /// The machines this change names, for the audit index.
    pub fn machines_named(&self) -> Vec<&str> {
        match self {
            Change::MachineAdded { hostname, .. }
            | Change::MachineUpdated { hostname, .. }
            | Change::MachineRemoved { hostname } => vec![hostname],
            Change::RequiredImageSet { hostnames, .. }
            | Change::PlannedImageSet { hostnames, .. } => {
                hostnames.iter().map(String::as_str).collect()
            }
            Change::Batch(changes) => changes.iter().flat_map(Change::machines_named).collect(),
            Change::MachinePaused { hostname, .. } | Change::SafetyCleared { hostname, .. } => {
                vec![hostname]
            }
            _ => vec![],
        }
    }

    /// The images this change names, for the audit index.
    pub fn images_named(&self) -> Vec<&str> {
        match self {
            Change::ImageAdded { name, .. } | Change::ImageDeleted { name } => vec![name],
            Change::MachineAdded {
                required_image,
                planned_image,
                ..
            } => required_image
                .iter()
                .chain(planned_image)
                .map(String::as_str)
                .collect(),
            Change::RequiredImageSet { image, .. } | Change::PlannedImageSet { image, .. } => {
                image.iter().map(String::as_str).collect()
            }
            Change::Batch(changes) => changes.iter().flat_map(Change::images_named).collect(),
            Change::SafetyCleared { image, .. } => vec![image],
            _ => vec![],
        }
    }

    /// The stable name of this kind of change, as shown in the audit log.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::ImageAdded { .. } => "image_added",
            Change::ImageDeleted { .. } => "image_deleted",
            Change::MachineAdded { .. } => "machine_added",
            Change::MachineUpdated { .. } => "machine_updated",
            Change::MachineRemoved { .. } => "machine_removed",
            Change::RequiredImageSet { .. } => "required_image_set",
            Change::PlannedImageSet { .. } => "planned_image_set",
            Change::UpdatesHalted => "updates_halted",
            Change::UpdatesResumed => "updates_resumed",
            Change::Batch(_) => "batch",
            Change::PolicySet(_) => "policy_set",
            Change::MachinePaused { .. } => "machine_paused",
            Change::SafetyCleared { .. } => "safety_cleared",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EventError {
    #[error("event is not valid protobuf: {0}")]
    Malformed(String),
    #[error("event carries no change this version knows (written by a newer dom?)")]
    UnknownChange,
    #[error("a hash must be 32 bytes, got {0}")]
    BadRootHash(usize),
}

fn optional(name: String) -> Option<String> {
    if name.is_empty() {
        None
    } else {
        Some(name)
    }
}

impl Event {
    pub fn encode(&self) -> Vec<u8> {
        pb::Event::from(self.clone()).encode_to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<Event, EventError> {
        let message = pb::Event::decode(bytes).map_err(|e| EventError::Malformed(e.to_string()))?;
        Event::try_from(message)
    }
}

pub fn trigger_to_pb(t: Trigger) -> pb::Trigger {
    pb::Trigger {
        match_lines: t.match_lines,
        service: t.service,
        do_reload: t.do_reload,
        do_reboot: t.do_reboot,
        high_impact: t.high_impact,
    }
}

pub fn trigger_from_pb(t: pb::Trigger) -> Trigger {
    Trigger {
        match_lines: t.match_lines,
        service: t.service,
        do_reload: t.do_reload,
        do_reboot: t.do_reboot,
        high_impact: t.high_impact,
    }
}

/// A machine change inside a batch; other kinds cannot be batched (and `check` refuses them).
fn batched_to_pb(change: Change) -> Option<pb::BatchedChange> {
    use pb::batched_change::Change as B;
    use pb::event::Change as C;
    let event = pb::Event::from(Event {
        actor: String::new(),
        time_unix_ms: 0,
        reason: String::new(),
        change,
    });
    let change = match event.change? {
        C::MachineAdded(m) => B::MachineAdded(m),
        C::MachineUpdated(m) => B::MachineUpdated(m),
        C::MachineRemoved(m) => B::MachineRemoved(m),
        C::RequiredImageSet(m) => B::RequiredImageSet(m),
        C::PlannedImageSet(m) => B::PlannedImageSet(m),
        _ => return None,
    };
    Some(pb::BatchedChange {
        change: Some(change),
    })
}

fn batched_from_pb(batched: pb::BatchedChange) -> Result<Change, EventError> {
    use pb::batched_change::Change as B;
    use pb::event::Change as C;
    let change = match batched.change.ok_or(EventError::UnknownChange)? {
        B::MachineAdded(m) => C::MachineAdded(m),
        B::MachineUpdated(m) => C::MachineUpdated(m),
        B::MachineRemoved(m) => C::MachineRemoved(m),
        B::RequiredImageSet(m) => C::RequiredImageSet(m),
        B::PlannedImageSet(m) => C::PlannedImageSet(m),
    };
    Ok(Event::try_from(pb::Event {
        change: Some(change),
        ..Default::default()
    })?
    .change)
}

impl From<Event> for pb::Event {
    fn from(event: Event) -> Self {
        use pb::event::Change as C;
        let change = match event.change {
            Change::ImageAdded {
                name,
                root_hash,
                files,
                bytes,
                manifest_hash,
                filter,
                triggers,
            } => C::ImageAdded(pb::ImageAdded {
                name,
                root_hash: root_hash.to_vec(),
                files,
                bytes,
                manifest_hash: manifest_hash.map(|h| h.to_vec()).unwrap_or_default(),
                filter,
                triggers: triggers.into_iter().map(trigger_to_pb).collect(),
            }),
            Change::ImageDeleted { name } => C::ImageDeleted(pb::ImageDeleted { name }),
            Change::MachineAdded {
                hostname,
                tags,
                required_image,
                planned_image,
            } => C::MachineAdded(pb::MachineAdded {
                hostname,
                tags,
                required_image: required_image.unwrap_or_default(),
                planned_image: planned_image.unwrap_or_default(),
            }),
            Change::MachineUpdated { hostname, tags } => {
                C::MachineUpdated(pb::MachineUpdated { hostname, tags })
            }
            Change::MachineRemoved { hostname } => {
                C::MachineRemoved(pb::MachineRemoved { hostname })
            }
            Change::RequiredImageSet { hostnames, image } => {
                C::RequiredImageSet(pb::RequiredImageSet {
                    hostnames,
                    image: image.unwrap_or_default(),
                })
            }
            Change::PlannedImageSet { hostnames, image } => {
                C::PlannedImageSet(pb::PlannedImageSet {
                    hostnames,
                    image: image.unwrap_or_default(),
                })
            }
            Change::UpdatesHalted => C::UpdatesHalted(pb::UpdatesHalted {}),
            Change::UpdatesResumed => C::UpdatesResumed(pb::UpdatesResumed {}),
            Change::Batch(changes) => C::Batch(pb::ChangeBatch {
                changes: changes.into_iter().filter_map(batched_to_pb).collect(),
            }),
            Change::PolicySet(p) => C::PolicySet(pb::PolicySet {
                max_updating: p.max_updating,
                max_updating_percent: p.max_updating_percent,
                max_high_impact: p.max_high_impact,
                fetch_bytes_per_sec: p.fetch_bytes_per_sec,
                brake_failure_percent: p.brake_failure_percent,
            }),
            Change::MachinePaused {
                hostname,
                duration_ms,
            } => C::MachinePaused(pb::MachinePaused {
                hostname,
                duration_ms,
            }),
            Change::SafetyCleared { hostname, image } => {
                C::SafetyCleared(pb::SafetyCleared { hostname, image })
            }
        };
        pb::Event {
            actor: event.actor,
            time_unix_ms: event.time_unix_ms,
            reason: event.reason,
            change: Some(change),
        }
    }
}

impl TryFrom<pb::Event> for Event {
    type Error = EventError;

    fn try_from(event: pb::Event) -> Result<Self, EventError> {
        use pb::event::Change as C;
        let change = match event.change.ok_or(EventError::UnknownChange)? {
            C::ImageAdded(m) => Change::ImageAdded {
                root_hash: m
                    .root_hash
                    .as_slice()
                    .try_into()
                    .map_err(|_| EventError::BadRootHash(m.root_hash.len()))?,
                manifest_hash: match m.manifest_hash.len() {
                    0 => None,
                    32 => m.manifest_hash.as_slice().try_into().ok(),
                    n => return Err(EventError::BadRootHash(n)),
                },
                name: m.name,
                files: m.files,
                bytes: m.bytes,
                filter: m.filter,
                triggers: m.triggers.into_iter().map(trigger_from_pb).collect(),
            },
            C::ImageDeleted(m) => Change::ImageDeleted { name: m.name },
            C::MachineAdded(m) => Change::MachineAdded {
                hostname: m.hostname,
                tags: m.tags,
                required_image: optional(m.required_image),
                planned_image: optional(m.planned_image),
            },
            C::MachineUpdated(m) => Change::MachineUpdated {
                hostname: m.hostname,
                tags: m.tags,
            },
            C::MachineRemoved(m) => Change::MachineRemoved {
                hostname: m.hostname,
            },
            C::RequiredImageSet(m) => Change::RequiredImageSet {
                hostnames: m.hostnames,
                image: optional(m.image),
            },
            C::PlannedImageSet(m) => Change::PlannedImageSet {
                hostnames: m.hostnames,
                image: optional(m.image),
            },
            C::UpdatesHalted(_) => Change::UpdatesHalted,
            C::UpdatesResumed(_) => Change::UpdatesResumed,
            C::Batch(batch) => Change::Batch(
                batch
                    .changes
                    .into_iter()
                    .map(batched_from_pb)
                    .collect::<Result<_, _>>()?,
            ),
            C::PolicySet(p) => Change::PolicySet(PolicyChange {
                max_updating: p.max_updating,
                max_updating_percent: p.max_updating_percent,
                max_high_impact: p.max_high_impact,
                fetch_bytes_per_sec: p.fetch_bytes_per_sec,
                brake_failure_percent: p.brake_failure_percent,
            }),
            C::MachinePaused(m) => Change::MachinePaused {
                hostname: m.hostname,
                duration_ms: m.duration_ms,
            },
            C::SafetyCleared(m) => Change::SafetyCleared {
                hostname: m.hostname,
                image: m.image,
            },
        };
        Ok(Event {
            actor: event.actor,
            time_unix_ms: event.time_unix_ms,
            reason: event.reason,
            change,
        })
    }
}

#[cfg(test)]
mod tests {
    //! Golden encodings: the bytes in `testdata/events/` were written by an earlier version and
    //! must decode to the same event forever. A failure here means a change broke the log's
    //! contract; fix the change, never the golden file.

    use super::*;

    /// One event of every kind. Add a line for each new kind; never edit an existing one.
    pub(crate) fn every_kind() -> Vec<(&'static str, Event)> {
        let event = |change| Event {
            actor: "alice".into(),
            time_unix_ms: 1_795_000_000_000,
            reason: "golden".into(),
            change,
        };
        let tags = BTreeMap::from([
            ("dc".to_owned(), "dc1".to_owned()),
            ("role".to_owned(), "web".to_owned()),
        ]);
        vec![
            (
                "image_added",
                event(Change::ImageAdded {
                    name: "web/2026.11.01".into(),
                    root_hash: [7; 32],
                    files: 1200,
                    bytes: 1 << 30,
                    manifest_hash: None,
                    filter: vec![],
                    triggers: vec![],
                }),
            ),
            (
                "image_added_with_manifest",
                event(Change::ImageAdded {
                    name: "web/2026.11.15".into(),
                    root_hash: [8; 32],
                    files: 3,
                    bytes: 300,
                    manifest_hash: Some([9; 32]),
                    filter: vec!["/tmp/.*".into(), "/etc/hostname".into()],
                    triggers: vec![Trigger {
                        match_lines: vec!["/etc/ssh/.*".into()],
                        service: "ssh".into(),
                        do_reload: true,
                        do_reboot: false,
                        high_impact: false,
                    }],
                }),
            ),
            (
                "image_deleted",
                event(Change::ImageDeleted {
                    name: "web/2026.11.01".into(),
                }),
            ),
            (
                "machine_added",
                event(Change::MachineAdded {
                    hostname: "web-01".into(),
                    tags: tags.clone(),
                    required_image: Some("web/2026.11.01".into()),
                    planned_image: None,
                }),
            ),
            (
                "machine_updated",
                event(Change::MachineUpdated {
                    hostname: "web-01".into(),
                    tags,
                }),
            ),
            (
                "machine_removed",
                event(Change::MachineRemoved {
                    hostname: "web-01".into(),
                }),
            ),
            (
                "required_image_set",
                event(Change::RequiredImageSet {
                    hostnames: vec!["web-01".into(), "web-02".into()],
                    image: Some("web/2026.11.15".into()),
                }),
            ),
            (
                "planned_image_set",
                event(Change::PlannedImageSet {
                    hostnames: vec!["web-01".into()],
                    image: None,
                }),
            ),
            ("updates_halted", event(Change::UpdatesHalted)),
            ("updates_resumed", event(Change::UpdatesResumed)),
            (
                "batch",
                event(Change::Batch(vec![
                    Change::MachineAdded {
                        hostname: "web-03".into(),
                        tags: BTreeMap::new(),
                        required_image: Some("web/2026.11.01".into()),
                        planned_image: None,
                    },
                    Change::PlannedImageSet {
                        hostnames: vec!["web-01".into()],
                        image: Some("web/2026.11.15".into()),
                    },
                ])),
            ),
            (
                "policy_set",
                event(Change::PolicySet(PolicyChange {
                    max_updating: None,
                    max_updating_percent: Some(20),
                    max_high_impact: Some(1),
                    fetch_bytes_per_sec: Some(10 << 20),
                    brake_failure_percent: None,
                })),
            ),
            (
                "machine_paused",
                event(Change::MachinePaused {
                    hostname: "web-01".into(),
                    duration_ms: 3_600_000,
                }),
            ),
            (
                "safety_cleared",
                event(Change::SafetyCleared {
                    hostname: "web-01".into(),
                    image: "web/2026.11.15".into(),
                }),
            ),
        ]
    }

    fn golden_path(kind: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/events")
            .join(format!("{kind}.bin"))
    }

    #[test]
    fn golden_encodings_decode_to_the_same_event() {
        for (kind, expected) in every_kind() {
            assert!(
                kind.starts_with(expected.change.kind()),
                "{kind} is not a {}",
                expected.change.kind()
            );
            let path = golden_path(kind);
            if std::env::var_os("DOM_WRITE_GOLDEN").is_some() && !path.exists() {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, expected.encode()).unwrap();
            }
            let golden = std::fs::read(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (new kind? run with DOM_WRITE_GOLDEN=1 once)",
                    path.display()
                )
            });
            assert_eq!(
                Event::decode(&golden).as_ref(),
                Ok(&expected),
                "{kind}: old bytes decode differently"
            );
            assert_eq!(expected.encode(), golden, "{kind}: encoding changed");
        }
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        assert!(matches!(
            Event::decode(&[0xff, 0xff, 0xff]),
            Err(EventError::Malformed(_))
        ));
        assert_eq!(Event::decode(&[]), Err(EventError::UnknownChange));
        let short_hash = pb::Event {
            change: Some(pb::event::Change::ImageAdded(pb::ImageAdded {
                root_hash: vec![1, 2],
                ..Default::default()
            })),
            ..Default::default()
        };
        assert_eq!(
            Event::decode(&short_hash.encode_to_vec()),
            Err(EventError::BadRootHash(2))
        );
    }
}
