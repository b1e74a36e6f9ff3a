//! Request paths of the registry pull API: repository names, tags and digests, validated
//! against distribution's grammar before anything else looks at them (no path traversal).

use std::fmt;

use crate::error::RegistryError;

/// A `sha256:<64 hex>` digest; the only algorithm registries use for content addressing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        let invalid = || {
            RegistryError::digest_invalid(
                http::StatusCode::BAD_REQUEST,
                format!(
                    "invalid digest {text:?}: expected sha256: followed by 64 lower-case hex digits"
                ),
            )
        };
        let hex = text.strip_prefix("sha256:").ok_or_else(invalid)?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(invalid());
        }
        Ok(Self {
            hex: hex.to_owned(),
        })
    }

    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self::from_hasher(sha2::Sha256::new_with_prefix(bytes))
    }

    pub fn from_hasher(hasher: sha2::Sha256) -> Self {
        use sha2::Digest as _;
        Self {
            hex: hex::encode(hasher.finalize()),
        }
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(tag) => f.write_str(tag),
            Reference::Digest(digest) => digest.fmt(f),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Manifest,
    Blob,
}

/// `/v2/<name>/manifests/<reference>` or `/v2/<name>/blobs/<digest>`, name not yet routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryPath {
    pub name: String,
    pub kind: Kind,
    pub reference: Reference,
}

/// Parses the part of a request path after `/v2/` (still percent-encoded, so an encoded `..`
/// or `/` fails the grammar instead of being decoded into something else).
pub fn parse_path(rest: &str) -> Result<RegistryPath, RegistryError> {
    let (name, kind, reference) = if let Some(index) = rest.rfind("/manifests/") {
        (
            &rest[..index],
            Kind::Manifest,
            &rest[index + "/manifests/".len()..],
        )
    } else if let Some(index) = rest.rfind("/blobs/") {
        (&rest[..index], Kind::Blob, &rest[index + "/blobs/".len()..])
    } else {
        return Err(RegistryError::new(
            http::StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            format!(
                "unsupported registry API path /v2/{rest}: this cache serves manifests and blobs only"
            ),
        ));
    };
    if name.is_empty() {
        return Err(RegistryError::name_invalid("empty repository name"));
    }
    let reference = match kind {
        Kind::Blob => Reference::Digest(Digest::parse(reference)?),
        Kind::Manifest if reference.contains(':') => Reference::Digest(Digest::parse(reference)?),
        Kind::Manifest => {
            if !valid_tag(reference) {
                return Err(RegistryError::new(
                    http::StatusCode::BAD_REQUEST,
                    "TAG_INVALID",
                    format!(
                        "invalid tag {reference:?}: at most 128 of [A-Za-z0-9_.-], not starting with . or -"
                    ),
                ));
            }
            Reference::Tag(reference.to_owned())
        }
    };
    Ok(RegistryPath {
        name: name.to_owned(),
        kind,
        reference,
    })
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`, distribution's path-component grammar.
pub fn valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    if bytes.is_empty() || !is_alnum(bytes[0]) || !is_alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut index = 0;
    while index < bytes.len() {
        if is_alnum(bytes[index]) {
            index += 1;
            continue;
        }
        let start = index;
        while index < bytes.len() && !is_alnum(bytes[index]) {
            index += 1;
        }
        let separator = &component[start..index];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(byte: u8) -> bool {
    byte.is_ascii_lowercase() || byte.is_ascii_digit()
}

/// A repository name: components joined by `/`, at most 255 bytes.
pub fn valid_repository(name: &str) -> bool {
    name.len() <= 255 && name.split('/').all(valid_component)
}

fn valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_nested_names_with_tags_and_digests() {
        let path = parse_path("quay.io/containers/podman/manifests/latest").unwrap();
        assert_eq!(path.name, "quay.io/containers/podman");
        assert_eq!(path.kind, Kind::Manifest);
        assert_eq!(path.reference, Reference::Tag("latest".into()));
        let path = parse_path(&format!("library/busybox/blobs/sha256:{HEX}")).unwrap();
        assert_eq!(path.kind, Kind::Blob);
        assert_eq!(path.reference.to_string(), format!("sha256:{HEX}"));
        // A repository may itself be called "manifests": the last marker wins.
        let path = parse_path("a/manifests/b/manifests/v1").unwrap();
        assert_eq!(path.name, "a/manifests/b");
    }

    #[test]
    fn rejects_traversal_and_bad_grammar() {
        for name in [
            "..",
            "a/../b",
            "a/%2e%2e/b",
            "A/b",
            "a//b",
            "-a",
            "a-",
            "a..b",
            "a/./b",
            "a b",
        ] {
            assert!(!valid_repository(name), "{name} must be rejected");
        }
        for name in ["library/busybox", "a__b", "a---b", "quay.io", "x/y.z_w"] {
            assert!(valid_repository(name), "{name} must be accepted");
        }
    }

    #[test]
    fn rejects_bad_references() {
        assert_eq!(
            parse_path("a/blobs/latest").unwrap_err().code,
            "DIGEST_INVALID"
        );
        assert_eq!(
            parse_path("a/blobs/sha512:00").unwrap_err().code,
            "DIGEST_INVALID"
        );
        assert_eq!(
            parse_path(&format!("a/blobs/sha256:{}", &HEX[..63]))
                .unwrap_err()
                .code,
            "DIGEST_INVALID"
        );
        assert_eq!(
            parse_path("a/manifests/.hidden").unwrap_err().code,
            "TAG_INVALID"
        );
        assert_eq!(
            parse_path("a/manifests/..%2f..").unwrap_err().code,
            "TAG_INVALID"
        );
        assert_eq!(parse_path("a/tags/list").unwrap_err().code, "UNSUPPORTED");
        assert_eq!(parse_path("/manifests/x").unwrap_err().code, "NAME_INVALID");
    }

    #[test]
    fn digest_of_bytes() {
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
