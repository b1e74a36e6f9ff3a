//! The helper image, built from podfleet's own binary: no registry and no separately
//! released helper to keep in step. The image holds the binary and the shared libraries it
//! needs, the host's `git` with `git-remote-http(s)` and the scripts `git submodule` runs
//! (plus their libraries, found with `ldd`), a static busybox as `/bin/sh` for those
//! scripts, and the host's CA certificates. It is packed as a `docker save` archive
//! (`manifest.json`, a config JSON, one uncompressed layer) that `POST /images/load` takes.
//!
//! Why bundle the host's git rather than a git implementation in Rust: git's smart HTTP,
//! shallow fetches, submodules and clean flags are exactly gitlab-runner's behaviour for
//! free, and a Rust git stack (gix with HTTP transport) would add minutes of compile time on
//! these 2-core machines for less fidelity.
//!
//! The tag is `localhost/podfleet-helper:<first 16 hex digits of the binary's SHA-256>`, so a
//! new podfleet build yields a new helper image; built archives are cached on disk under
//! that hash.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use crate::stage::BINARY_PATH;
use crate::tar::TarWriter;

/// The image's repository name (the tag is the binary's hash).
pub const REPOSITORY: &str = "localhost/podfleet-helper";
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
const BUSYBOX: &str = "/bin/busybox";
/// Applets linked to busybox: what `git submodule`'s shell scripts and a debugging session use.
const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "sed", "cat", "rm", "mkdir", "basename", "dirname", "tr", "grep", "printf", "test", "[",
    "echo", "ls", "env", "cut", "wc", "uname", "sort", "head", "tail", "expr",
];
/// The git programs the helper runs; the rest of git's exec path is not needed.
const GIT_PROGRAMS: &[&str] = &[
    "git-remote-http",
    "git-remote-https",
    "git-submodule",
    "git-sh-setup",
    "git-sh-i18n",
    "git-sh-i18n--envsubst",
];

/// The helper image reference for the running binary (`/proc/self/exe`).
pub fn reference() -> String {
    static REFERENCE: OnceLock<String> = OnceLock::new();
    REFERENCE
        .get_or_init(|| match own_hash() {
            Ok(hash) => reference_for_hash(&hash),
            // Unreadable own binary: docker_archive() reports the cause; the name stays valid.
            Err(_) => format!("{REPOSITORY}:unknown"),
        })
        .clone()
}

/// The helper image of the running binary as a `docker save` archive, from the on-disk cache
/// when already built.
pub fn docker_archive() -> io::Result<Vec<u8>> {
    docker_archive_of(Path::new("/proc/self/exe"), &default_cache_dir())
}

/// The helper image of the running binary as an archive file (built and cached when
/// missing), for loads that read a file (a provider's shared image store).
pub fn docker_archive_file() -> io::Result<PathBuf> {
    let cache_dir = default_cache_dir();
    let cached = cached_archive(&cache_dir, &own_hash()?);
    if !cached.exists() {
        docker_archive_of(Path::new("/proc/self/exe"), &cache_dir)?;
    }
    if cached.exists() {
        Ok(cached)
    } else {
        Err(io::Error::other(format!(
            "the helper image archive {} could not be written",
            cached.display()
        )))
    }
}

fn cached_archive(cache_dir: &Path, hash: &str) -> PathBuf {
    cache_dir.join(format!("helper-{}.tar", &hash[..16.min(hash.len())]))
}

/// The running binary's hash, computed once per process (and remembered on disk per file
/// identity, see [`cached_hash`]).
fn own_hash() -> io::Result<String> {
    static HASH: OnceLock<Result<String, String>> = OnceLock::new();
    HASH.get_or_init(|| {
        cached_hash(Path::new("/proc/self/exe"), &default_cache_dir()).map_err(|e| e.to_string())
    })
    .clone()
    .map_err(io::Error::other)
}

/// [`binary_hash`], remembered in `cache_dir` under the file's device, inode, size and
/// modification time: hashing a large unoptimised binary takes many seconds, and every
/// manager process (and test) would pay it again.
pub fn cached_hash(binary: &Path, cache_dir: &Path) -> io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(binary)?;
    let stamp = cache_dir.join(format!(
        "hash-{}-{}-{}-{}.{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec()
    ));
    if let Ok(hash) = fs::read_to_string(&stamp)
        && hash.len() == 64
        && hash.bytes().all(|byte| byte.is_ascii_hexdigit())
    {
        return Ok(hash);
    }
    let hash = binary_hash(binary)?;
    if fs::create_dir_all(cache_dir).is_ok() {
        let _ = fs::write(&stamp, &hash);
    }
    Ok(hash)
}

/// The image reference for a binary with this hash.
pub fn reference_for_hash(hash: &str) -> String {
    format!("{REPOSITORY}:{}", &hash[..16.min(hash.len())])
}

/// The `docker save` archive of the helper image built around `binary`, cached as
/// `<cache_dir>/helper-<hash>.tar`.
pub fn docker_archive_of(binary: &Path, cache_dir: &Path) -> io::Result<Vec<u8>> {
    let hash = cached_hash(binary, cache_dir)?;
    let cached = cached_archive(cache_dir, &hash);
    if let Ok(bytes) = fs::read(&cached) {
        return Ok(bytes);
    }
    let archive = build_archive(binary, &reference_for_hash(&hash))?;
    // Caching is an optimisation: a read-only or full disk only costs a rebuild next time.
    if fs::create_dir_all(cache_dir).is_ok() {
        // Unique per process and call: two jobs of one manager may build at once.
        static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let build = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let partial = cached.with_extension(format!("tar.{}-{build}.part", std::process::id()));
        if fs::write(&partial, &archive).is_ok() && fs::rename(&partial, &cached).is_err() {
            let _ = fs::remove_file(&partial);
        }
        prune(cache_dir, STALE_AFTER);
    }
    Ok(archive)
}

/// Archives and hash stamps of other binaries untouched this long are removed when a new
/// archive is written (one is rebuilt in about a second if its binary comes back).
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn prune(cache_dir: &Path, stale_after: std::time::Duration) {
    let Ok(entries) = fs::read_dir(cache_dir) else {
        return;
    };
    let now = std::time::SystemTime::now();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours =
            (name.starts_with("helper-") && name.contains(".tar")) || name.starts_with("hash-");
        let stale = entry
            .metadata()
            .and_then(|meta| meta.modified())
            .is_ok_and(|modified| {
                now.duration_since(modified)
                    .is_ok_and(|age| age > stale_after)
            });
        if ours && stale {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// `/var/cache/podfleet` when it can be used (root), else a directory in the temp dir.
fn default_cache_dir() -> PathBuf {
    let system = PathBuf::from("/var/cache/podfleet");
    if fs::create_dir_all(&system).is_ok() && is_writable(&system) {
        return system;
    }
    std::env::temp_dir().join("podfleet-helper-cache")
}

fn is_writable(dir: &Path) -> bool {
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    let writable = fs::write(&probe, b"").is_ok();
    let _ = fs::remove_file(&probe);
    writable
}

/// Hex SHA-256 of a file.
pub fn binary_hash(binary: &Path) -> io::Result<String> {
    let mut file = fs::File::open(binary).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!(
                "cannot read podfleet's binary {}: {error}",
                binary.display()
            ),
        )
    })?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = io::Read::read(&mut file, &mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Files of the image: path in the image → where its bytes come from, or a symlink.
enum Entry {
    File { source: PathBuf, mode: u32 },
    Bytes { contents: Vec<u8>, mode: u32 },
    Symlink(String),
}

fn build_archive(binary: &Path, reference: &str) -> io::Result<Vec<u8>> {
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    // A debug build of podfleet is mostly debug information (270 MB, of which about 40 MB
    // code): the image gets the binary without it when binutils' `strip` is there.
    let copy = BinaryCopy::of(binary)?;
    add_with_libraries(&mut entries, &copy.path, BINARY_PATH)?;

    let exec_path = git_exec_path()?;
    let git = exec_path.join("git");
    add_with_libraries(&mut entries, &git, &format!("{}/git", exec_path.display()))?;
    entries.insert(
        "/usr/local/bin/git".to_owned(),
        Entry::Symlink(format!("{}/git", exec_path.display())),
    );
    for program in GIT_PROGRAMS {
        let source = exec_path.join(program);
        if source.exists() {
            add_with_libraries(&mut entries, &source, &source.display().to_string())?;
        }
    }

    let busybox = find_busybox()?;
    entries.insert(
        BUSYBOX.to_owned(),
        Entry::File {
            source: busybox,
            mode: 0o755,
        },
    );
    for applet in BUSYBOX_APPLETS {
        entries.insert(
            format!("/bin/{applet}"),
            Entry::Symlink("busybox".to_owned()),
        );
    }
    if Path::new(CA_BUNDLE).exists() {
        entries.insert(
            CA_BUNDLE.to_owned(),
            Entry::File {
                source: PathBuf::from(CA_BUNDLE),
                mode: 0o644,
            },
        );
    }
    entries.insert(
        "/etc/passwd".to_owned(),
        Entry::Bytes {
            contents:
                b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
                    .to_vec(),
            mode: 0o644,
        },
    );
    // What the container runtime mounts over or links in the root filesystem, present in the
    // image so that it needs no write there: an image in a shared store (see the local
    // provider) belongs to a user the container does not map, and its directories cannot be
    // written.
    entries.insert(
        "/etc/mtab".to_owned(),
        Entry::Symlink("/proc/mounts".to_owned()),
    );
    for mount_point in ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf"] {
        entries.insert(
            mount_point.to_owned(),
            Entry::Bytes {
                contents: Vec::new(),
                mode: 0o644,
            },
        );
    }
    entries.insert(
        "/etc/group".to_owned(),
        Entry::Bytes {
            contents: b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
            mode: 0o644,
        },
    );

    let layer = layer_tar(&entries)?;
    let layer_digest = hex::encode(Sha256::digest(&layer));
    let path_env = format!("PATH=/usr/local/bin:{}:/usr/bin:/bin", exec_path.display());
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": [
                path_env,
                "HOME=/tmp",
                format!("GIT_SSL_CAINFO={CA_BUNDLE}"),
                format!("SSL_CERT_FILE={CA_BUNDLE}"),
            ],
            "Cmd": [BINARY_PATH, "helper", "--version"],
            "WorkingDir": "/",
            "Labels": { "io.podfleet.helper": "true" },
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_digest}")] },
        "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "podfleet helper image" }],
    });
    let config = serde_json::to_vec(&config).expect("a JSON value always serialises");
    let config_digest = hex::encode(Sha256::digest(&config));
    let manifest = serde_json::json!([{
        "Config": format!("{config_digest}.json"),
        "RepoTags": [reference],
        "Layers": [format!("{layer_digest}/layer.tar")],
    }]);
    let manifest = serde_json::to_vec(&manifest).expect("a JSON value always serialises");

    let mut archive = TarWriter::new(Vec::with_capacity(layer.len() + 8192));
    archive.file(&format!("{config_digest}.json"), 0o644, &config)?;
    archive.directory(&layer_digest, 0o755)?;
    archive.file(&format!("{layer_digest}/layer.tar"), 0o644, &layer)?;
    archive.file("manifest.json", 0o644, &manifest)?;
    archive.finish()
}

/// A copy of the binary at a real path, without debug sections and symbols when binutils'
/// `strip` is there; removed when dropped. `strip` and `ldd` run in child processes, where
/// `/proc/self/exe` would name the child's own program, so they get the copy.
struct BinaryCopy {
    path: PathBuf,
}

impl BinaryCopy {
    fn of(binary: &Path) -> io::Result<Self> {
        static COPIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let copy = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let copy = Self {
            path: std::env::temp_dir().join(format!(
                "podfleet-helper-binary-{}-{copy}",
                std::process::id()
            )),
        };
        fs::copy(binary, &copy.path)?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&copy.path, fs::Permissions::from_mode(0o755))?;
        // Best effort: without strip the image is only larger. Symbols go too: every
        // instance loads the image before its first helper stage, and a release binary's
        // symbol tables are a sixth of it.
        let _ = Command::new("strip")
            .arg("--strip-all")
            .arg(&copy.path)
            .output();
        Ok(copy)
    }
}

impl Drop for BinaryCopy {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn layer_tar(entries: &BTreeMap<String, Entry>) -> io::Result<Vec<u8>> {
    let mut layer = TarWriter::new(Vec::new());
    let mut directories: std::collections::BTreeSet<String> =
        // No /run: the runtime creates files in it (`.containerenv`), so it must be made by
        // the runtime, in the container's own writable layer.
        [
            "/tmp", "/etc", "/bin", "/root", "/builds", "/cache", "/proc", "/sys", "/dev",
        ]
            .iter()
            .map(|dir| (*dir).to_owned())
            .collect();
    for path in entries.keys() {
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent.filter(|dir| *dir != Path::new("/")) {
            directories.insert(dir.display().to_string());
            parent = dir.parent();
        }
    }
    for dir in &directories {
        let mode = if dir == "/tmp" { 0o1777 } else { 0o755 };
        layer.directory(dir, mode)?;
    }
    for (path, entry) in entries {
        match entry {
            Entry::File { source, mode } => {
                let contents = fs::read(source).map_err(|error| {
                    io::Error::new(
                        error.kind(),
                        format!(
                            "cannot read {} for the helper image: {error}",
                            source.display()
                        ),
                    )
                })?;
                layer.file(path, *mode, &contents)?;
            }
            Entry::Bytes { contents, mode } => layer.file(path, *mode, contents)?,
            Entry::Symlink(target) => layer.symlink(path, target)?,
        }
    }
    layer.finish()
}

/// Adds `source` at `image_path` and every shared library `ldd` lists for it, each at the
/// path the dynamic loader looks for (symlinks resolved to their contents).
fn add_with_libraries(
    entries: &mut BTreeMap<String, Entry>,
    source: &Path,
    image_path: &str,
) -> io::Result<()> {
    let mode = if is_executable(source) { 0o755 } else { 0o644 };
    entries.insert(
        image_path.to_owned(),
        Entry::File {
            source: source.to_owned(),
            mode,
        },
    );
    if !is_elf(source)? {
        return Ok(());
    }
    for library in shared_libraries(source)? {
        let path = library.display().to_string();
        entries.entry(path).or_insert(Entry::File {
            source: library,
            mode: 0o755,
        });
    }
    Ok(())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|meta| meta.permissions().mode() & 0o111 != 0)
}

fn is_elf(path: &Path) -> io::Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = fs::File::open(path)?;
    Ok(file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF")
}

/// The shared libraries of an ELF file as `ldd` resolves them (the loader included); none
/// for a static binary.
fn shared_libraries(binary: &Path) -> io::Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(binary).output().map_err(|error| {
        io::Error::new(
            error.kind(),
            format!(
                "cannot run ldd to find the libraries of {}: {error} (install libc-bin)",
                binary.display()
            ),
        )
    })?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // ldd fails for static binaries ("not a dynamic executable"): nothing to add.
        return Ok(Vec::new());
    }
    parse_ldd(&text, binary)
}

fn parse_ldd(text: &str, binary: &Path) -> io::Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.contains("not found") {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} needs a library this host lacks: {line}",
                    binary.display()
                ),
            ));
        }
        let path = match line.split_once("=>") {
            Some((_, resolved)) => resolved.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|path| path.starts_with('/')) {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

fn git_exec_path() -> io::Result<PathBuf> {
    let output = Command::new("git")
        .arg("--exec-path")
        .output()
        .map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("cannot run git to build the helper image: {error} (install git on the manager host)"),
            )
        })?;
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if !output.status.success() || !path.join("git").exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "git --exec-path gave {}, which holds no git binary",
                path.display()
            ),
        ));
    }
    Ok(path)
}

fn find_busybox() -> io::Result<PathBuf> {
    for candidate in ["/usr/bin/busybox", "/bin/busybox", "/usr/sbin/busybox"] {
        let path = PathBuf::from(candidate);
        if path.exists() {
            if !shared_libraries(&path)?.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{candidate} is dynamically linked; install busybox-static for the helper image"
                    ),
                ));
            }
            return Ok(path);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no busybox for the helper image's /bin/sh (git submodule needs a shell): install busybox-static",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In the running binary's read-only data, so it is in the image only if the image
    /// holds this very binary.
    static SELF_MARKER: &str = "podfleet-helper-image-self-marker-5e21c9";

    #[test]
    fn the_image_of_the_running_binary_holds_that_binary_stripped() {
        let cache =
            std::env::temp_dir().join(format!("podfleet-image-self-{}", std::process::id()));
        let archive = docker_archive_of(Path::new("/proc/self/exe"), &cache).unwrap();
        let _ = fs::remove_dir_all(&cache);
        let marker = std::hint::black_box(SELF_MARKER).as_bytes();
        assert!(
            archive.windows(marker.len()).any(|w| w == marker),
            "the image does not hold the running binary"
        );
        let own_size = fs::metadata("/proc/self/exe").unwrap().len() as usize;
        assert!(archive.len() < own_size + 64 * 1024 * 1024 || own_size < 8 * 1024 * 1024);
    }

    #[test]
    fn ldd_output_is_parsed_into_library_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text, Path::new("git")).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        let missing = parse_ldd("\tlibfoo.so.1 => not found\n", Path::new("git")).unwrap_err();
        assert!(missing.to_string().contains("libfoo"), "{missing}");
    }

    #[test]
    fn stale_archives_and_stamps_are_pruned_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3 * 24 * 3600);
        for (name, age) in [
            ("helper-0000000000000000.tar", Some(old)),
            ("hash-1-2-3-4.5", Some(old)),
            ("helper-1111111111111111.tar", None),
            ("unrelated.tar", Some(old)),
        ] {
            let file = fs::File::create(dir.path().join(name)).unwrap();
            if let Some(time) = age {
                file.set_modified(time).unwrap();
            }
        }
        prune(dir.path(), STALE_AFTER);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["helper-1111111111111111.tar", "unrelated.tar"]);
    }

    #[test]
    fn the_reference_derives_from_the_hash() {
        assert_eq!(
            reference_for_hash("0123456789abcdef0123"),
            "localhost/podfleet-helper:0123456789abcdef"
        );
    }
}
