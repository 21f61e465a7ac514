//! Dominator trigger files: JSON `[{"MatchLines": [...], "Service": ..., "DoReload": ...,
//! "DoReboot": ..., "HighImpact": ...}]`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Trigger {
    pub match_lines: Vec<String>,
    pub service: String,
    #[serde(default)]
    pub do_reload: bool,
    #[serde(default)]
    pub do_reboot: bool,
    #[serde(default)]
    pub high_impact: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    #[error("triggers are not valid JSON in Dominator's format: {0}")]
    Json(String),
    #[error("trigger {index} has no Service")]
    NoService { index: usize },
    #[error("trigger {index} ({service}) has an invalid MatchLines regex {pattern:?}")]
    BadRegex {
        index: usize,
        service: String,
        pattern: String,
    },
}

pub fn parse_triggers(text: &str) -> Result<Vec<Trigger>, TriggerError> {
    let triggers: Vec<Trigger> =
        serde_json::from_str(text).map_err(|e| TriggerError::Json(e.to_string()))?;
    for (index, trigger) in triggers.iter().enumerate() {
        if trigger.service.trim().is_empty() {
            return Err(TriggerError::NoService { index: index + 1 });
        }
        for pattern in &trigger.match_lines {
            if regex::Regex::new(&format!("^(?:{pattern})$")).is_err() {
                return Err(TriggerError::BadRegex {
                    index: index + 1,
                    service: trigger.service.clone(),
                    pattern: pattern.clone(),
                });
            }
        }
    }
    Ok(triggers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixture_triggers_parse() {
        let triggers =
            parse_triggers(include_str!("../../testdata/fixtures/triggers.json")).unwrap();
        assert_eq!(triggers.len(), 4);
        assert!(triggers[0].do_reload && triggers[0].service == "ssh");
        assert!(triggers[3].do_reboot && triggers[3].high_impact);
    }

    #[test]
    fn malformed_triggers_are_refused() {
        assert!(matches!(parse_triggers("[{"), Err(TriggerError::Json(_))));
        assert!(matches!(
            parse_triggers(r#"[{"MatchLines": [], "Service": ""}]"#),
            Err(TriggerError::NoService { .. })
        ));
        assert!(matches!(
            parse_triggers(r#"[{"MatchLines": ["/etc/(x"], "Service": "x"}]"#),
            Err(TriggerError::BadRegex { .. })
        ));
    }
}
