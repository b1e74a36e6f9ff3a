//! `rules:if` / `only:variables` expressions and the `exists`/`changes` globs, evaluated as
//! GitLab does: `$VAR` presence, `==`/`!=` against strings or `null`, `=~`/`!~` against a
//! `/regex/flags` literal (or a variable holding one), `&&` before `||`, parentheses.

use regex::Regex;

/// Looks a variable up: `None` when it is not defined.
pub(crate) trait Lookup {
    fn lookup(&self, name: &str) -> Option<String>;
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Variable(String),
    Text(String),
    Pattern(String),
    Null,
    Equal,
    NotEqual,
    Matches,
    NotMatches,
    And,
    Or,
    Open,
    Close,
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let characters: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut index = 0;
    while index < characters.len() {
        let character = characters[index];
        let next = characters.get(index + 1).copied();
        match character {
            ' ' | '\t' | '\n' | '\r' => index += 1,
            '$' => {
                index += 1;
                let braced = characters.get(index) == Some(&'{');
                if braced {
                    index += 1;
                }
                let start = index;
                while index < characters.len()
                    && (characters[index].is_ascii_alphanumeric() || characters[index] == '_')
                {
                    index += 1;
                }
                if start == index {
                    return Err(format!("a variable name must follow '$' at offset {start}"));
                }
                let name: String = characters[start..index].iter().collect();
                if braced {
                    if characters.get(index) != Some(&'}') {
                        return Err(format!("'${{{name}' is missing its closing '}}'"));
                    }
                    index += 1;
                }
                tokens.push(Token::Variable(name));
            }
            '"' | '\'' => {
                let quote = character;
                index += 1;
                let mut value = String::new();
                loop {
                    match characters.get(index) {
                        None => return Err(format!("a string opened with {quote} is not closed")),
                        Some('\\') if characters.get(index + 1) == Some(&quote) => {
                            value.push(quote);
                            index += 2;
                        }
                        Some(&c) if c == quote => {
                            index += 1;
                            break;
                        }
                        Some(&c) => {
                            value.push(c);
                            index += 1;
                        }
                    }
                }
                tokens.push(Token::Text(value));
            }
            '/' => {
                index += 1;
                let mut pattern = String::new();
                loop {
                    match characters.get(index) {
                        None => return Err("a /regex/ literal is not closed".to_owned()),
                        Some('\\') if characters.get(index + 1) == Some(&'/') => {
                            pattern.push('/');
                            index += 2;
                        }
                        Some('/') => {
                            index += 1;
                            break;
                        }
                        Some(&c) => {
                            pattern.push(c);
                            index += 1;
                        }
                    }
                }
                let mut flags = String::new();
                while let Some(&flag) = characters.get(index) {
                    if !flag.is_ascii_alphabetic() {
                        break;
                    }
                    flags.push(flag);
                    index += 1;
                }
                tokens.push(Token::Pattern(compose_pattern(&pattern, &flags)?));
            }
            '=' if next == Some('=') => {
                tokens.push(Token::Equal);
                index += 2;
            }
            '!' if next == Some('=') => {
                tokens.push(Token::NotEqual);
                index += 2;
            }
            '=' if next == Some('~') => {
                tokens.push(Token::Matches);
                index += 2;
            }
            '!' if next == Some('~') => {
                tokens.push(Token::NotMatches);
                index += 2;
            }
            '&' if next == Some('&') => {
                tokens.push(Token::And);
                index += 2;
            }
            '|' if next == Some('|') => {
                tokens.push(Token::Or);
                index += 2;
            }
            '(' => {
                tokens.push(Token::Open);
                index += 1;
            }
            ')' => {
                tokens.push(Token::Close);
                index += 1;
            }
            _ if characters[index..].starts_with(&['n', 'u', 'l', 'l'])
                && !characters
                    .get(index + 4)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_') =>
            {
                tokens.push(Token::Null);
                index += 4;
            }
            other => {
                return Err(format!(
                    "unexpected {other:?} at offset {index} (expected $VARIABLE, \"string\", /regex/, null, ==, !=, =~, !~, &&, ||, or parentheses)"
                ));
            }
        }
    }
    Ok(tokens)
}

/// A Rust regex for a GitLab `/pattern/flags` literal (i: case-insensitive, m: multi-line,
/// s: dot matches newline).
fn compose_pattern(pattern: &str, flags: &str) -> Result<String, String> {
    let mut inline = String::new();
    for flag in flags.chars() {
        match flag {
            'i' | 'm' | 's' => inline.push(flag),
            other => {
                return Err(format!(
                    "regex flag {other:?} is not supported (use i, m or s)"
                ));
            }
        }
    }
    let composed = if inline.is_empty() {
        pattern.to_owned()
    } else {
        format!("(?{inline}){pattern}")
    };
    Regex::new(&composed).map_err(|error| format!("invalid regex /{pattern}/: {error}"))?;
    Ok(composed)
}

#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Text(String),
    Null,
    Pattern(String),
}

impl Operand {
    fn truthy(&self) -> bool {
        match self {
            Operand::Text(text) => !text.is_empty(),
            Operand::Null => false,
            Operand::Pattern(_) => true,
        }
    }
}

/// A parsed expression, ready to evaluate against variables.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expression {
    Operand(OperandSource),
    Compare {
        left: OperandSource,
        operator: Comparison,
        right: OperandSource,
    },
    And(Box<Expression>, Box<Expression>),
    Or(Box<Expression>, Box<Expression>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum OperandSource {
    Variable(String),
    Text(String),
    Pattern(String),
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Comparison {
    Equal,
    NotEqual,
    Matches,
    NotMatches,
}

struct ExpressionParser {
    tokens: Vec<Token>,
    position: usize,
}

impl ExpressionParser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.position)
    }

    fn or(&mut self) -> Result<Expression, String> {
        let mut left = self.and()?;
        while self.peek() == Some(&Token::Or) {
            self.position += 1;
            left = Expression::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expression, String> {
        let mut left = self.comparison()?;
        while self.peek() == Some(&Token::And) {
            self.position += 1;
            left = Expression::And(Box::new(left), Box::new(self.comparison()?));
        }
        Ok(left)
    }

    fn comparison(&mut self) -> Result<Expression, String> {
        if self.peek() == Some(&Token::Open) {
            self.position += 1;
            let inner = self.or()?;
            if self.peek() != Some(&Token::Close) {
                return Err("a '(' is not closed".to_owned());
            }
            self.position += 1;
            return Ok(inner);
        }
        let left = self.operand()?;
        let operator = match self.peek() {
            Some(Token::Equal) => Comparison::Equal,
            Some(Token::NotEqual) => Comparison::NotEqual,
            Some(Token::Matches) => Comparison::Matches,
            Some(Token::NotMatches) => Comparison::NotMatches,
            _ => return Ok(Expression::Operand(left)),
        };
        self.position += 1;
        let right = self.operand()?;
        Ok(Expression::Compare {
            left,
            operator,
            right,
        })
    }

    fn operand(&mut self) -> Result<OperandSource, String> {
        let token = self.tokens.get(self.position).cloned();
        self.position += 1;
        match token {
            Some(Token::Variable(name)) => Ok(OperandSource::Variable(name)),
            Some(Token::Text(text)) => Ok(OperandSource::Text(text)),
            Some(Token::Pattern(pattern)) => Ok(OperandSource::Pattern(pattern)),
            Some(Token::Null) => Ok(OperandSource::Null),
            Some(other) => Err(format!(
                "expected a $VARIABLE, a \"string\", a /regex/ or null, found {}",
                describe(&other)
            )),
            None => Err("the expression ends where a value is expected".to_owned()),
        }
    }
}

fn describe(token: &Token) -> &'static str {
    match token {
        Token::Equal => "==",
        Token::NotEqual => "!=",
        Token::Matches => "=~",
        Token::NotMatches => "!~",
        Token::And => "&&",
        Token::Or => "||",
        Token::Open => "(",
        Token::Close => ")",
        _ => "a value",
    }
}

/// Parses an expression (errors are readable and name the problem).
pub(crate) fn parse(text: &str) -> Result<Expression, String> {
    let tokens = tokenize(text)?;
    if tokens.is_empty() {
        return Err("the expression is empty".to_owned());
    }
    let mut parser = ExpressionParser {
        tokens,
        position: 0,
    };
    let expression = parser.or()?;
    if let Some(extra) = parser.peek() {
        return Err(format!(
            "unexpected {} after a complete expression",
            describe(extra)
        ));
    }
    Ok(expression)
}

fn resolve(source: &OperandSource, variables: &dyn Lookup) -> Operand {
    match source {
        OperandSource::Variable(name) => {
            variables.lookup(name).map_or(Operand::Null, Operand::Text)
        }
        OperandSource::Text(text) => Operand::Text(text.clone()),
        OperandSource::Pattern(pattern) => Operand::Pattern(pattern.clone()),
        OperandSource::Null => Operand::Null,
    }
}

/// A variable's value used as the right side of `=~`: `/pattern/flags` is a regex, as GitLab
/// reads it; anything else is matched literally.
fn as_pattern(operand: &Operand) -> Result<Option<String>, String> {
    match operand {
        Operand::Pattern(pattern) => Ok(Some(pattern.clone())),
        Operand::Null => Ok(None),
        Operand::Text(text) => {
            if let Some(body) = text.strip_prefix('/')
                && let Some(end) = body.rfind('/')
            {
                return compose_pattern(&body[..end], &body[end + 1..]).map(Some);
            }
            Ok(Some(regex::escape(text)))
        }
    }
}

impl Expression {
    /// Evaluates against `variables`; a regex that fails to compile is an error.
    pub(crate) fn evaluate(&self, variables: &dyn Lookup) -> Result<bool, String> {
        match self {
            Expression::Operand(source) => Ok(resolve(source, variables).truthy()),
            Expression::And(left, right) => {
                Ok(left.evaluate(variables)? && right.evaluate(variables)?)
            }
            Expression::Or(left, right) => {
                Ok(left.evaluate(variables)? || right.evaluate(variables)?)
            }
            Expression::Compare {
                left,
                operator,
                right,
            } => {
                let left = resolve(left, variables);
                let right = resolve(right, variables);
                match operator {
                    Comparison::Equal => Ok(left == right),
                    Comparison::NotEqual => Ok(left != right),
                    Comparison::Matches | Comparison::NotMatches => {
                        let matched = match (&left, as_pattern(&right)?) {
                            (Operand::Text(text), Some(pattern)) => Regex::new(&pattern)
                                .map_err(|error| format!("invalid regex {pattern}: {error}"))?
                                .is_match(text),
                            _ => false,
                        };
                        Ok(matched == (*operator == Comparison::Matches))
                    }
                }
            }
        }
    }
}

/// A glob as GitLab's `exists`/`changes` read it (Ruby `File.fnmatch` with `FNM_PATHNAME`,
/// `FNM_DOTMATCH` and `FNM_EXTGLOB`): `*` and `?` stay inside a directory, `**/` spans
/// directories, `{a,b}` alternates, `[...]` is a character class.
pub(crate) fn glob(pattern: &str) -> Result<Regex, String> {
    let characters: Vec<char> = pattern.trim_start_matches("./").chars().collect();
    let mut regex = String::from("^");
    let mut index = 0;
    let mut braces = 0;
    while index < characters.len() {
        let character = characters[index];
        match character {
            '*' if characters.get(index + 1) == Some(&'*') => {
                if characters.get(index + 2) == Some(&'/') {
                    regex.push_str("(?:.*/)?");
                    index += 3;
                } else {
                    regex.push_str(".*");
                    index += 2;
                }
                continue;
            }
            '*' => regex.push_str("[^/]*"),
            '?' => regex.push_str("[^/]"),
            '{' => {
                braces += 1;
                regex.push_str("(?:");
            }
            '}' if braces > 0 => {
                braces -= 1;
                regex.push(')');
            }
            ',' if braces > 0 => regex.push('|'),
            '[' => {
                let Some(end) = characters[index..].iter().position(|&c| c == ']') else {
                    return Err(format!("glob {pattern:?} has a '[' without ']'"));
                };
                let class: String = characters[index + 1..index + end].iter().collect();
                let class = class
                    .strip_prefix('!')
                    .map_or(class.clone(), |rest| format!("^{rest}"));
                regex.push('[');
                regex.push_str(&class.replace('\\', "\\\\"));
                regex.push(']');
                index += end + 1;
                continue;
            }
            '\\' if index + 1 < characters.len() => {
                regex.push_str(&regex::escape(&characters[index + 1].to_string()));
                index += 2;
                continue;
            }
            other => regex.push_str(&regex::escape(&other.to_string())),
        }
        index += 1;
    }
    if braces > 0 {
        return Err(format!("glob {pattern:?} has a '{{' without '}}'"));
    }
    regex.push('$');
    Regex::new(&regex).map_err(|error| format!("invalid glob {pattern:?}: {error}"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    impl Lookup for HashMap<&str, &str> {
        fn lookup(&self, name: &str) -> Option<String> {
            self.get(name).map(|value| value.to_string())
        }
    }

    fn check(text: &str, variables: &[(&'static str, &'static str)]) -> bool {
        let variables: HashMap<&str, &str> = variables.iter().copied().collect();
        parse(text)
            .unwrap_or_else(|error| panic!("{text}: {error}"))
            .evaluate(&variables)
            .unwrap_or_else(|error| panic!("{text}: {error}"))
    }

    #[test]
    fn comparisons_presence_and_null() {
        let vars = [("BRANCH", "main"), ("EMPTY", "")];
        assert!(check("$BRANCH == \"main\"", &vars));
        assert!(check("$BRANCH != 'dev'", &vars));
        assert!(check("${BRANCH} == $BRANCH", &vars));
        assert!(check("$BRANCH", &vars));
        assert!(!check("$EMPTY", &vars));
        assert!(!check("$MISSING", &vars));
        assert!(check("$MISSING == null", &vars));
        assert!(!check("$EMPTY == null", &vars));
        assert!(check("$EMPTY == \"\"", &vars));
    }

    #[test]
    fn regexes_with_flags_and_from_variables() {
        let vars = [("REF", "Release-1.2"), ("PATTERN", "/^release-/i")];
        assert!(check("$REF =~ /^release-\\d/i", &vars));
        assert!(!check("$REF =~ /^release-/", &vars));
        assert!(check("$REF !~ /^main$/", &vars));
        assert!(check("$REF =~ $PATTERN", &vars));
        assert!(!check("$MISSING =~ /x/", &vars));
        assert!(check("$MISSING !~ /x/", &vars));
        assert!(check("$REF =~ /a\\/b/ || $REF", &vars));
    }

    #[test]
    fn and_binds_tighter_than_or_and_parentheses_group() {
        let vars = [("A", "1")];
        assert!(check("$A || $B && $C", &vars));
        assert!(!check("($A || $B) && $C", &vars));
        assert!(check("($A == '1') && ($B == null)", &vars));
    }

    #[test]
    fn syntax_errors_are_described() {
        assert!(parse("$A ==").unwrap_err().contains("ends where a value"));
        assert!(parse("($A").unwrap_err().contains("not closed"));
        assert!(parse("$A = 'x'").unwrap_err().contains("unexpected '='"));
        assert!(parse("$A =~ /[/").unwrap_err().contains("invalid regex"));
        assert!(parse("$A $B").unwrap_err().contains("after a complete"));
    }

    #[test]
    fn globs_follow_fnmatch() {
        let matches = |pattern: &str, path: &str| glob(pattern).unwrap().is_match(path);
        assert!(matches("*.md", "README.md"));
        assert!(!matches("*.md", "docs/guide.md"));
        assert!(matches("**/*.md", "docs/guide.md"));
        assert!(matches("**/*.md", "README.md"));
        assert!(matches("src/**/*.{rs,toml}", "src/a/b/c.toml"));
        // fnmatch matches whole paths: a directory name alone is not its files.
        assert!(!matches("docs", "docs/guide.md"));
        assert!(matches("docs/**/*", "docs/guide.md"));
        assert!(matches("file?.txt", "file1.txt"));
        assert!(matches("[ab].txt", "a.txt"));
        assert!(!matches("[!ab].txt", "a.txt"));
        assert!(matches(".hidden/*", ".hidden/x"));
    }
}
