//! The two kinds of names operators type: hostnames and image names.
//!
//! Names are made canonical at the edge (`canonical_*`) and apply only accepts canonical names,
//! so the log never holds two spellings of one machine or image.

use std::borrow::Cow;

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("hostname {0:?} is empty")]
    EmptyHostname(String),
    #[error("hostname {0:?} is longer than 253 characters")]
    HostnameTooLong(String),
    #[error("hostname {name:?} has an invalid label {label:?}: labels are 1-63 letters, digits or '-', not starting or ending with '-'")]
    BadHostnameLabel { name: String, label: String },
    #[error("image name {0:?} is empty")]
    EmptyImageName(String),
    #[error("image name {name:?} has an invalid component {component:?}: components are letters, digits, '.', '_' or '-', and not empty, '.' or '..'")]
    BadImageComponent { name: String, component: String },
    #[error("image name {0:?} is longer than 255 characters")]
    ImageNameTooLong(String),
    #[error("tag key {0:?} is invalid: keys are 1-63 letters, digits, '.', '_', '-' or '/'")]
    BadTagKey(String),
    #[error(
        "tag value {value:?} of {key:?} is longer than 255 characters or has a control character"
    )]
    BadTagValue { key: String, value: String },
}

/// An RFC 1123 hostname, lower-cased.
pub fn canonical_hostname(name: &str) -> Result<String, NameError> {
    canonical_hostname_cow(name).map(Cow::into_owned)
}

/// As [`canonical_hostname`], but borrowing `name` when it is already canonical: apply checks
/// every name of every event it folds, and nearly all of them are.
pub fn canonical_hostname_cow(name: &str) -> Result<Cow<'_, str>, NameError> {
    let trimmed = name.trim_end_matches('.');
    let lower = if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        Cow::Borrowed(trimmed)
    };
    if lower.is_empty() {
        return Err(NameError::EmptyHostname(name.to_owned()));
    }
    if lower.len() > 253 {
        return Err(NameError::HostnameTooLong(name.to_owned()));
    }
    // Split as bytes: '.' is ASCII, so no label is cut inside a character.
    for label in lower.as_bytes().split(|&b| b == b'.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.first() != Some(&b'-')
            && label.last() != Some(&b'-')
            && label
                .iter()
                .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(NameError::BadHostnameLabel {
                name: name.to_owned(),
                label: String::from_utf8_lossy(label).into_owned(),
            });
        }
    }
    Ok(lower)
}

/// A Dominator-style image name (`web/2026.11.01`); a leading `/` is dropped.
pub fn canonical_image_name(name: &str) -> Result<String, NameError> {
    canonical_image_name_ref(name).map(str::to_owned)
}

/// As [`canonical_image_name`], borrowing from `name` (canonical form only drops a leading
/// `/`), so apply's check of every image name it meets allocates nothing.
pub fn canonical_image_name_ref(name: &str) -> Result<&str, NameError> {
    let trimmed = name.strip_prefix('/').unwrap_or(name);
    if trimmed.is_empty() {
        return Err(NameError::EmptyImageName(name.to_owned()));
    }
    if trimmed.len() > 255 {
        return Err(NameError::ImageNameTooLong(name.to_owned()));
    }
    // Split as bytes: '/' is ASCII, so no component is cut inside a character.
    for component in trimmed.as_bytes().split(|&b| b == b'/') {
        let ok = !component.is_empty()
            && component != b"."
            && component != b".."
            && component
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            return Err(NameError::BadImageComponent {
                name: name.to_owned(),
                component: String::from_utf8_lossy(component).into_owned(),
            });
        }
    }
    Ok(trimmed)
}

pub fn check_tag(key: &str, value: &str) -> Result<(), NameError> {
    let key_ok = !key.is_empty()
        && key.len() <= 63
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    if !key_ok {
        return Err(NameError::BadTagKey(key.to_owned()));
    }
    if value.len() > 255 || value.chars().any(char::is_control) {
        return Err(NameError::BadTagValue {
            key: key.to_owned(),
            value: value.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_lower_cased_rfc1123() {
        assert_eq!(
            canonical_hostname("Web-01.DC1.example.com").as_deref(),
            Ok("web-01.dc1.example.com")
        );
        assert_eq!(canonical_hostname("web-01.").as_deref(), Ok("web-01"));
        for bad in [
            "",
            "-web",
            "web-",
            "we_b",
            "a..b",
            "web 01",
            "wéb",
            &"a".repeat(64),
        ] {
            assert!(canonical_hostname(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn canonical_names_are_borrowed_and_the_rest_refused_alike() {
        assert!(matches!(
            canonical_hostname_cow("web-01.dc1"),
            Ok(Cow::Borrowed("web-01.dc1"))
        ));
        assert_eq!(canonical_image_name_ref("/web/1"), Ok("web/1"));
        assert_eq!(
            canonical_hostname("a.-b.c"),
            Err(NameError::BadHostnameLabel {
                name: "a.-b.c".into(),
                label: "-b".into()
            })
        );
        assert_eq!(
            canonical_hostname("Wéb.x"),
            Err(NameError::BadHostnameLabel {
                name: "Wéb.x".into(),
                label: "wéb".into()
            })
        );
        assert_eq!(
            canonical_image_name("/web/é:1"),
            Err(NameError::BadImageComponent {
                name: "/web/é:1".into(),
                component: "é:1".into()
            })
        );
    }

    #[test]
    fn image_names_are_path_like() {
        assert_eq!(
            canonical_image_name("/web/2026.11.01").as_deref(),
            Ok("web/2026.11.01")
        );
        assert_eq!(
            canonical_image_name("db/v1_2-3").as_deref(),
            Ok("db/v1_2-3")
        );
        for bad in [
            "", "/", "web//x", "web/../x", "..", "web/.", "web/x y", "web/x:1", "web/",
        ] {
            assert!(canonical_image_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn tags_refuse_empty_keys_and_control_characters() {
        assert!(check_tag("role", "web").is_ok());
        assert!(check_tag("", "web").is_err());
        assert!(check_tag("role", "a\nb").is_err());
    }
}
