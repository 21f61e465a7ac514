//! The two kinds of names operators type: hostnames and image names.
//!
//! Names are made canonical at the edge (`canonical_*`) and apply only accepts canonical names,
//! so the log never holds two spellings of one machine or image.

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
    let lower = name.trim_end_matches('.').to_ascii_lowercase();
    if lower.is_empty() {
        return Err(NameError::EmptyHostname(name.to_owned()));
    }
    if lower.len() > 253 {
        return Err(NameError::HostnameTooLong(name.to_owned()));
    }
    for label in lower.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(NameError::BadHostnameLabel {
                name: name.to_owned(),
                label: label.to_owned(),
            });
        }
    }
    Ok(lower)
}

/// A Dominator-style image name (`web/2026.11.01`); a leading `/` is dropped.
pub fn canonical_image_name(name: &str) -> Result<String, NameError> {
    let trimmed = name.strip_prefix('/').unwrap_or(name);
    if trimmed.is_empty() {
        return Err(NameError::EmptyImageName(name.to_owned()));
    }
    if trimmed.len() > 255 {
        return Err(NameError::ImageNameTooLong(name.to_owned()));
    }
    for component in trimmed.split('/') {
        let ok = !component.is_empty()
            && component != "."
            && component != ".."
            && component
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            return Err(NameError::BadImageComponent {
                name: name.to_owned(),
                component: component.to_owned(),
            });
        }
    }
    Ok(trimmed.to_owned())
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
