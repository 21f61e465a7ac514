//! Dominator filter files: one regular expression a line, matched against the whole path.

use std::sync::Arc;

use regex::RegexSet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter line {line} ({pattern:?}) is not a valid regular expression: {reason}")]
pub struct FilterError {
    pub line: usize,
    pub pattern: String,
    pub reason: String,
}

/// Paths an image leaves alone.
///
/// Shared, not copied, when cloned: every machine's soft state and every plan toward an
/// image holds one, and a compiled set's clone would allocate caches of its own.
#[derive(Debug, Clone)]
pub struct Filter(Arc<Compiled>);

#[derive(Debug)]
struct Compiled {
    lines: Vec<String>,
    set: RegexSet,
}

impl Filter {
    /// Compiled once: every machine's fresh soft state starts with one.
    pub fn empty() -> Filter {
        static EMPTY: std::sync::LazyLock<Filter> = std::sync::LazyLock::new(|| {
            Filter::new(Vec::new())
                .unwrap_or_else(|_| unreachable!("an empty filter always compiles"))
        });
        EMPTY.clone()
    }

    /// Parses a filter file's text; empty lines are skipped.
    pub fn parse(text: &str) -> Result<Filter, FilterError> {
        Filter::new(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }

    pub fn new(lines: Vec<String>) -> Result<Filter, FilterError> {
        for (i, line) in lines.iter().enumerate() {
            regex::Regex::new(&format!("^(?:{line})$")).map_err(|e| FilterError {
                line: i + 1,
                pattern: line.clone(),
                reason: e
                    .to_string()
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            })?;
        }
        let set =
            RegexSet::new(lines.iter().map(|l| format!("^(?:{l})$"))).map_err(|e| FilterError {
                line: 0,
                pattern: String::new(),
                reason: e.to_string(),
            })?;
        Ok(Filter(Arc::new(Compiled { lines, set })))
    }

    pub fn lines(&self) -> &[String] {
        &self.0.lines
    }

    /// Whether `path` (absolute, as in a manifest) is left alone.
    pub fn excludes(&self, path: &str) -> bool {
        self.0.set.is_match(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixture_filter_matches_whole_paths() {
        let filter = Filter::parse(include_str!("../../testdata/fixtures/filter")).unwrap();
        assert!(filter.excludes("/tmp/x"));
        assert!(filter.excludes("/var/log/syslog"));
        assert!(filter.excludes("/etc/hostname"));
        assert!(
            !filter.excludes("/etc/hostname.bak"),
            "a line matches the whole path, not a prefix"
        );
        assert!(!filter.excludes("/etc/passwd"));
    }

    #[test]
    fn a_bad_regex_names_its_line() {
        let error = Filter::parse("/tmp/.*\n/var/(log\n").unwrap_err();
        assert_eq!((error.line, error.pattern.as_str()), (2, "/var/(log"));
    }
}
