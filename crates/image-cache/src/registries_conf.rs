//! The `registries.conf.d` drop-in that points Podman/Buildah/Skopeo on an instance at the
//! cache: one `[[registry]]` per routed registry with the cache as its mirror.

/// A registry clients name (`quay.io`) and the cache's route prefix for it (usually the same).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorRoute {
    pub registry: String,
    pub cache_prefix: String,
}

impl MirrorRoute {
    pub fn same(name: &str) -> Self {
        Self {
            registry: name.to_owned(),
            cache_prefix: name.to_owned(),
        }
    }
}

/// Renders the drop-in (e.g. `/etc/containers/registries.conf.d/50-podfleet-cache.conf`).
/// `cache_address` is `HOST:PORT` as the instance reaches the cache; `insecure` for a cache
/// served over plain HTTP. The origin stays the fallback when the cache cannot be reached.
pub fn render_registries_conf_dropin(
    cache_address: &str,
    routes: &[MirrorRoute],
    insecure: bool,
) -> Result<String, String> {
    let plain = |text: &str| {
        !text.is_empty()
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_:/[]".contains(&b))
    };
    if !plain(cache_address) || cache_address.contains('/') {
        return Err(format!("cache address {cache_address:?} must be HOST:PORT"));
    }
    let mut out = String::from(
        "# Written by podfleet: pull through the podfleet image cache, origin as fallback.\n",
    );
    for route in routes {
        if !plain(&route.registry) || !crate::reference::valid_component(&route.cache_prefix) {
            return Err(format!(
                "mirror route {route:?}: registry must be a host[:port][/namespace] and cache_prefix a cache route prefix"
            ));
        }
        out.push_str(&format!(
            "\n[[registry]]\nprefix = \"{registry}\"\nlocation = \"{registry}\"\n\n[[registry.mirror]]\nlocation = \"{cache_address}/{prefix}\"\n{insecure}",
            registry = route.registry,
            prefix = route.cache_prefix,
            insecure = if insecure { "insecure = true\n" } else { "" },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_mirror_per_registry() {
        let text = render_registries_conf_dropin(
            "10.0.0.1:5000",
            &[MirrorRoute::same("docker.io"), MirrorRoute::same("quay.io")],
            true,
        )
        .unwrap();
        let expected = "# Written by podfleet: pull through the podfleet image cache, origin as fallback.\n\
\n[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\n[[registry.mirror]]\nlocation = \"10.0.0.1:5000/docker.io\"\ninsecure = true\n\
\n[[registry]]\nprefix = \"quay.io\"\nlocation = \"quay.io\"\n\n[[registry.mirror]]\nlocation = \"10.0.0.1:5000/quay.io\"\ninsecure = true\n";
        assert_eq!(text, expected);
        let parsed: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(parsed["registry"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn refuses_values_that_would_break_the_file() {
        assert!(render_registries_conf_dropin("a\"b", &[], true).is_err());
        assert!(
            render_registries_conf_dropin("h:1", &[MirrorRoute::same("quay.io\"\n[x]")], true)
                .is_err()
        );
        assert!(
            render_registries_conf_dropin(
                "h:1",
                &[MirrorRoute {
                    registry: "127.0.0.1:5000".into(),
                    cache_prefix: "127.0.0.1:5000".into()
                }],
                true
            )
            .is_err()
        );
    }
}
