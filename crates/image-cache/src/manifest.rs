//! Manifest validation: what the cache accepts from an upstream before storing it, and the
//! references garbage collection follows. Bytes are never rewritten (digests stay valid).

use serde_json::Value;

use crate::reference::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What the cache asks upstreams for, whatever the client accepts: one cached answer per tag.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedManifest {
    pub media_type: &'static str,
    /// Config and layers of an image manifest.
    pub blobs: Vec<Digest>,
    /// Entries of an index / manifest list.
    pub child_manifests: Vec<Digest>,
}

pub fn validate(bytes: &[u8]) -> Result<ParsedManifest, String> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|error| format!("not JSON: {error}"))?;
    let object = value.as_object().ok_or("not a JSON object")?;
    if object.get("schemaVersion").and_then(Value::as_u64) != Some(2) {
        return Err("schemaVersion is not 2 (schema 1 manifests are not supported)".into());
    }
    let media_type = match object.get("mediaType") {
        Some(Value::String(text)) => [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST]
            .into_iter()
            .find(|known| known == text)
            .ok_or_else(|| format!("unsupported mediaType {text:?}"))?,
        Some(_) => return Err("mediaType is not a string".into()),
        None if object.contains_key("manifests") => OCI_INDEX,
        None => OCI_MANIFEST,
    };
    let descriptor = |value: &Value, place: &str| -> Result<Digest, String> {
        let digest = value
            .get("digest")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{place} has no digest"))?;
        value
            .get("size")
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("{place} has no size"))?;
        Digest::parse(digest).map_err(|error| format!("{place}: {}", error.message))
    };
    let list = |key: &str| -> Result<&Vec<Value>, String> {
        object
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| format!("{key} is missing or not an array"))
    };
    let mut parsed = ParsedManifest {
        media_type,
        blobs: Vec::new(),
        child_manifests: Vec::new(),
    };
    if media_type == OCI_INDEX || media_type == DOCKER_LIST {
        for (index, entry) in list("manifests")?.iter().enumerate() {
            parsed
                .child_manifests
                .push(descriptor(entry, &format!("manifests[{index}]"))?);
        }
    } else {
        let config = object.get("config").ok_or("config is missing")?;
        parsed.blobs.push(descriptor(config, "config")?);
        for (index, layer) in list("layers")?.iter().enumerate() {
            parsed
                .blobs
                .push(descriptor(layer, &format!("layers[{index}]"))?);
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn accepts_images_and_indexes() {
        let image = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"digest":"{D}","size":1}},"layers":[{{"digest":"{D}","size":2}}]}}"#
        );
        let parsed = validate(image.as_bytes()).unwrap();
        assert_eq!(parsed.media_type, DOCKER_MANIFEST);
        assert_eq!(parsed.blobs.len(), 2);
        let index = format!(r#"{{"schemaVersion":2,"manifests":[{{"digest":"{D}","size":3}}]}}"#);
        let parsed = validate(index.as_bytes()).unwrap();
        assert_eq!(parsed.media_type, OCI_INDEX);
        assert_eq!(parsed.child_manifests.len(), 1);
    }

    #[test]
    fn rejects_malformed_manifests() {
        for (bad, why) in [
            ("{", "not JSON"),
            ("[]", "not a JSON object"),
            (r#"{"schemaVersion":1}"#, "schemaVersion"),
            (
                r#"{"schemaVersion":2,"mediaType":"text/html"}"#,
                "unsupported mediaType",
            ),
            (r#"{"schemaVersion":2,"layers":[]}"#, "config is missing"),
            (
                r#"{"schemaVersion":2,"config":{"digest":"sha256:../../etc","size":1},"layers":[]}"#,
                "config:",
            ),
            (
                r#"{"schemaVersion":2,"manifests":[{"digest":"x"}]}"#,
                "manifests[0]",
            ),
        ] {
            let error = validate(bad.as_bytes()).unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }
}
