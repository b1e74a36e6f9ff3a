//! The schema walker: reads a parsed TOML document into typed sections, collecting every
//! problem with its position instead of stopping at the first.
//!
//! Each section struct is declared once with [`section!`](crate::section): the declaration is
//! both the Rust type and the schema (key name, field, reader). Readers live in [`kind`].

use std::collections::HashMap;
use std::ops::Range;

use toml_edit::{Item, TableLike, Value};

use crate::problem::{LineIndex, Position, Problem};

/// A table of the document (or an absent one), with where it is and its key path.
pub(crate) struct TableView<'a> {
    pub table: Option<&'a dyn TableLike>,
    pub path: String,
    pub at: Position,
}

impl TableView<'_> {
    pub fn absent(path: String, at: Position) -> Self {
        Self {
            table: None,
            path,
            at,
        }
    }
}

/// One key of a section, as the reader for that key sees it.
pub(crate) struct Field<'a> {
    pub key: &'static str,
    pub path: String,
    pub item: Option<&'a Item>,
    /// The value's position when the key is present, else the enclosing table's.
    pub at: Position,
}

/// A section of the config: a struct whose keys and readers are declared by `section!`.
pub(crate) trait Section: Sized {
    /// Keys this section understands.
    const KEYS: &'static [&'static str];
    /// gitlab-runner keys that podfleet accepts but does not use, with the advice to give.
    const IGNORED: &'static [(&'static str, &'static str)];

    fn read_fields(walker: &mut Walker<'_>, table: &TableView<'_>) -> Self;
}

/// Reads a section and warns about every key it does not know.
pub(crate) fn read_section<T: Section>(walker: &mut Walker<'_>, table: &TableView<'_>) -> T {
    let value = T::read_fields(walker, table);
    walker.check_unknown_keys(table, T::KEYS, T::IGNORED);
    value
}

/// The value of a section when its table is absent: every reader's default.
pub(crate) fn defaults<T: Section>() -> T {
    let mut scratch = Walker::new("");
    T::read_fields(
        &mut scratch,
        &TableView::absent(String::new(), Position::START),
    )
}

pub(crate) struct Walker<'s> {
    lines: LineIndex<'s>,
    pub errors: Vec<Problem>,
    pub warnings: Vec<Problem>,
    /// Position of every key that was present, by key path, for checks that span sections.
    positions: HashMap<String, Position>,
}

impl<'s> Walker<'s> {
    pub fn new(text: &'s str) -> Self {
        Self {
            lines: LineIndex::new(text),
            errors: Vec::new(),
            warnings: Vec::new(),
            positions: HashMap::new(),
        }
    }

    pub fn position(&self, span: Option<Range<usize>>, fallback: Position) -> Position {
        span.map_or(fallback, |span| self.lines.position(span.start))
    }

    pub fn position_of(&self, key_path: &str) -> Option<Position> {
        self.positions.get(key_path).copied()
    }

    pub fn record(&mut self, key_path: &str, at: Position) {
        self.positions.insert(key_path.to_owned(), at);
    }

    pub fn error(&mut self, at: Position, key_path: &str, message: String, fix: String) {
        self.errors.push(problem(at, key_path, message, fix));
    }

    pub fn warning(&mut self, at: Position, key_path: &str, message: String, fix: String) {
        self.warnings.push(problem(at, key_path, message, fix));
    }

    pub fn field<'a>(&mut self, table: &TableView<'a>, key: &'static str) -> Field<'a> {
        let path = join_path(&table.path, key);
        let item = table
            .table
            .and_then(|table| table.get(key))
            .filter(|item| !item.is_none());
        let at = match item {
            Some(item) => {
                let at = self.position(item.span(), table.at);
                self.record(&path, at);
                at
            }
            None => table.at,
        };
        Field {
            key,
            path,
            item,
            at,
        }
    }

    fn check_unknown_keys(
        &mut self,
        table: &TableView<'_>,
        known: &[&str],
        ignored: &[(&str, &str)],
    ) {
        let Some(entries) = table.table else {
            return;
        };
        for (key, _) in entries.iter() {
            if known.contains(&key) {
                continue;
            }
            let span = entries.key(key).and_then(|key| key.span());
            let at = self.position(span, table.at);
            let path = join_path(&table.path, key);
            if let Some((_, advice)) = ignored.iter().find(|(name, _)| *name == key) {
                self.warning(
                    at,
                    &path,
                    "is a gitlab-runner setting that podfleet does not use; it is ignored"
                        .to_owned(),
                    (*advice).to_owned(),
                );
            } else if let Some(suggestion) = closest_key(key, known) {
                self.warning(
                    at,
                    &path,
                    "unknown key, ignored".to_owned(),
                    format!("did you mean \"{suggestion}\"?"),
                );
            } else {
                self.warning(
                    at,
                    &path,
                    "unknown key, ignored".to_owned(),
                    "remove it, or check its spelling and section against gitlab-runner's config.toml reference".to_owned(),
                );
            }
        }
    }
}

fn problem(at: Position, key_path: &str, message: String, fix: String) -> Problem {
    Problem {
        line: at.line,
        column: at.column,
        key_path: key_path.to_owned(),
        message,
        fix,
    }
}

pub(crate) fn join_path(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if plain {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if parent.is_empty() {
        key
    } else {
        format!("{parent}.{key}")
    }
}

/// The known key closest to a misspelt one, if one is close enough to be a likely typo.
pub(crate) fn closest_key<'k>(unknown: &str, known: &[&'k str]) -> Option<&'k str> {
    let normalize = |key: &str| key.to_ascii_lowercase().replace('-', "_");
    let unknown_normalized = normalize(unknown);
    let limit = (unknown.chars().count() / 3).clamp(1, 3);
    known
        .iter()
        .map(|candidate| {
            let distance = edit_distance(&unknown_normalized, &normalize(candidate));
            (distance, *candidate)
        })
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of two
/// neighbours each cost one, so "ulr" is one edit from "url".
fn edit_distance(left: &str, right: &str) -> usize {
    let left: Vec<char> = left.chars().collect();
    let right: Vec<char> = right.chars().collect();
    let width = right.len() + 1;
    let mut table = vec![0usize; (left.len() + 1) * width];
    for (i, cell) in table.iter_mut().step_by(width).enumerate() {
        *cell = i;
    }
    for (j, cell) in table.iter_mut().take(width).enumerate() {
        *cell = j;
    }
    for i in 1..=left.len() {
        for j in 1..=right.len() {
            let substitution = usize::from(left[i - 1] != right[j - 1]);
            let mut best = (table[(i - 1) * width + j] + 1)
                .min(table[i * width + j - 1] + 1)
                .min(table[(i - 1) * width + j - 1] + substitution);
            if i > 1 && j > 1 && left[i - 1] == right[j - 2] && left[i - 2] == right[j - 1] {
                best = best.min(table[(i - 2) * width + j - 2] + 1);
            }
            table[i * width + j] = best;
        }
    }
    table[left.len() * width + right.len()]
}

/// What kind of TOML value an item is, for "must be X, found Y" messages (never the value).
pub(crate) fn found(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
        Item::Value(value) => found_value(value),
    }
}

pub(crate) fn found_value(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::InlineTable(_) => "an inline table",
    }
}

/// Declares a config section: the struct, its `Default` (every reader's default) and its
/// schema (`Section`), from one list of `"toml_key" field: Type = reader` entries.
macro_rules! section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                $key:literal $field:ident : $ty:ty = $reader:expr
            ),* $(,)?
        }
        ignored = [ $( ($ignored:literal, $advice:expr) ),* $(,)? ];
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        impl $crate::walk::Section for $name {
            const KEYS: &'static [&'static str] = &[$($key),*];
            const IGNORED: &'static [(&'static str, &'static str)] = &[$(($ignored, $advice)),*];

            fn read_fields(
                walker: &mut $crate::walk::Walker<'_>,
                table: &$crate::walk::TableView<'_>,
            ) -> Self {
                Self {
                    $( $field: {
                        let field = walker.field(table, $key);
                        ($reader)(walker, &field)
                    }, )*
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                $crate::walk::defaults::<Self>()
            }
        }
    };
}

pub(crate) use section;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_their_key() {
        let known = [
            "concurrent",
            "check_interval",
            "url",
            "token",
            "tls-ca-file",
        ];
        assert_eq!(closest_key("concurent", &known), Some("concurrent"));
        assert_eq!(closest_key("ulr", &known), Some("url"));
        assert_eq!(closest_key("Token", &known), Some("token"));
        assert_eq!(closest_key("tls_ca_file", &known), Some("tls-ca-file"));
        assert_eq!(closest_key("completely_different", &known), None);
        assert_eq!(closest_key("id", &known), None);
    }

    #[test]
    fn odd_keys_are_quoted_in_paths() {
        assert_eq!(join_path("", "concurrent"), "concurrent");
        assert_eq!(
            join_path("runners[0]", "tls-ca-file"),
            "runners[0].tls-ca-file"
        );
        assert_eq!(join_path("a", "b c"), "a.\"b c\"");
    }
}
