//! A read-only image store every instance of the host reads (Podman's
//! `additionalimagestores`): an image shared there costs one load on the host instead of one
//! per instance. Root's Podman writes it under `<state_dir>/shared-images`; each instance's
//! `storage.conf` lists it.
//!
//! Files in it belong to the host's root, which no instance's user namespace maps: inside a
//! container they show as `nobody` and the image's own directories cannot be written (the
//! overlay copy-up fails). Only images that write nowhere but their mounts belong here, which
//! is why the provider shares what it is asked to (podfleet's helper image) and keeps loading
//! job images into each instance's own store.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use podfleet_host as host;

/// The store, under the provider's state dir (shared by every group of the host).
const STORE: &str = "shared-images";
/// Images shared longer ago than this and not shared since are removed at the next share.
const STALE_AFTER: Duration = Duration::from_secs(24 * 3600);

pub(crate) struct SharedStore {
    root: PathBuf,
    /// One marker per shared reference (its mtime is when it was last shared).
    refs: PathBuf,
    run_root: PathBuf,
}

impl SharedStore {
    pub(crate) fn new(state_dir: &Path) -> Self {
        Self {
            root: state_dir.join(STORE),
            refs: state_dir.join(format!("{STORE}.refs")),
            run_root: PathBuf::from("/run/podfleet").join(STORE),
        }
    }

    /// The `storage.conf` lines of an instance that reads the store, when it exists.
    pub(crate) fn storage_options(&self) -> Option<String> {
        self.root.join("overlay-images").is_dir().then(|| {
            format!(
                "[storage.options]\nadditionalimagestores = [\"{}\"]\n",
                self.root.display()
            )
        })
    }

    /// Makes `reference` (in the `docker save` archive `archive`) readable by every
    /// instance. Cheap when it already is. The caller holds the host lock.
    pub(crate) async fn share(&self, archive: &Path, reference: &str) -> Result<(), String> {
        let marker = self.refs.join(marker_name(reference));
        if marker.exists() && self.lists(reference) {
            touch(&marker);
            return Ok(());
        }
        std::fs::create_dir_all(&self.refs).map_err(|e| format!("{}: {e}", self.refs.display()))?;
        let archive_arg = archive.to_string_lossy();
        self.podman(&["load", "-q", "-i", &archive_arg]).await?;
        self.podman(&["image", "exists", reference])
            .await
            .map_err(|_| format!("{} does not hold {reference}", archive.display()))?;
        open_to_instances(&self.root)
            .map_err(|e| format!("opening {} to instances: {e}", self.root.display()))?;
        std::fs::write(&marker, reference).map_err(|e| format!("{}: {e}", marker.display()))?;
        self.prune(reference).await;
        Ok(())
    }

    /// Whether the store's image index names `reference` (no Podman process: this runs at
    /// every start).
    fn lists(&self, reference: &str) -> bool {
        std::fs::read_to_string(self.root.join("overlay-images/images.json"))
            .is_ok_and(|index| index.contains(&format!("\"{reference}\"")))
    }

    /// Removes images shared long ago and not since, other than `current`.
    async fn prune(&self, current: &str) {
        let Ok(entries) = std::fs::read_dir(&self.refs) else {
            return;
        };
        for entry in entries.flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|at| SystemTime::now().duration_since(at).ok())
                .is_some_and(|age| age > STALE_AFTER);
            let Ok(reference) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            if !stale || reference == current {
                continue;
            }
            match self.podman(&["rmi", "--force", &reference]).await {
                Ok(()) => {
                    let _ = std::fs::remove_file(entry.path());
                    tracing::info!(image = %reference, "stale image removed from the shared store");
                }
                Err(error) => {
                    tracing::warn!(image = %reference, %error, "removing a stale shared image failed")
                }
            }
        }
    }

    async fn podman(&self, args: &[&str]) -> Result<(), String> {
        let root = self.root.to_string_lossy();
        let run_root = self.run_root.to_string_lossy();
        let mut all = vec![
            "--root",
            &root,
            "--runroot",
            &run_root,
            "--storage-driver",
            "overlay",
        ];
        all.extend_from_slice(args);
        host::run("podman", &all)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

fn marker_name(reference: &str) -> String {
    reference
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

/// Podman makes its store private (0700 directories, 0600 metadata): instance users need to
/// read it. Layer contents (`overlay/<layer>/diff`) keep the modes the image gave them.
fn open_to_instances(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            continue;
        }
        let mode = entry.metadata()?.permissions().mode();
        if kind.is_dir() {
            let layer_contents = path.file_name().is_some_and(|n| n == "diff")
                && path
                    .parent()
                    .and_then(Path::parent)
                    .is_some_and(|p| p.file_name().is_some_and(|n| n == "overlay"));
            if !layer_contents {
                host::set_mode(&path, (mode & 0o7777) | 0o755)?;
                open_to_instances(&path)?;
            }
        } else {
            host::set_mode(&path, (mode & 0o7777) | 0o444)?;
        }
    }
    host::set_mode(dir, 0o755)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn the_store_is_opened_to_instances_but_layer_contents_keep_their_modes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let layer = root.join("overlay/abc/diff");
        std::fs::create_dir_all(layer.join("secret-dir")).unwrap();
        std::fs::create_dir_all(root.join("overlay-images/def")).unwrap();
        std::fs::write(root.join("overlay-images/images.json"), "[]").unwrap();
        std::fs::write(layer.join("private"), "x").unwrap();
        for (path, m) in [
            (layer.clone(), 0o555),
            (root.clone(), 0o700),
            (root.join("overlay"), 0o700),
            (root.join("overlay/abc"), 0o700),
            (root.join("overlay-images"), 0o700),
            (root.join("overlay-images/def"), 0o700),
            (root.join("overlay-images/images.json"), 0o600),
            (layer.join("secret-dir"), 0o700),
            (layer.join("private"), 0o600),
        ] {
            host::set_mode(&path, m).unwrap();
        }
        open_to_instances(&root).unwrap();
        assert_eq!(mode(&root), 0o755);
        assert_eq!(mode(&root.join("overlay/abc")), 0o755);
        assert_eq!(mode(&root.join("overlay-images/def")), 0o755);
        assert_eq!(mode(&root.join("overlay-images/images.json")), 0o644);
        assert_eq!(mode(&layer), 0o555);
        assert_eq!(mode(&layer.join("secret-dir")), 0o700);
        assert_eq!(mode(&layer.join("private")), 0o600);
    }

    #[test]
    fn marker_names_are_plain_file_names() {
        assert_eq!(
            marker_name("localhost/podfleet-helper:0123abcd"),
            "localhost_podfleet-helper_0123abcd"
        );
    }
}
