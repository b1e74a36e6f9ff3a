//! Zip archives as gitlab-runner writes them for artifacts and caches: deflated files,
//! stored directories and symlinks, Unix modes in the external attributes, the extended
//! timestamp extra field, UTF-8 names; and a reader that extracts into a root through
//! [`crate::paths`] so that no member lands outside it.
//!
//! Members larger than 4 GiB (zip64) are refused with a clear error.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use flate2::Compression;
use flate2::read::DeflateDecoder;
use flate2::write::DeflateEncoder;

use crate::paths;

const LOCAL_HEADER: u32 = 0x0403_4b50;
const CENTRAL_HEADER: u32 = 0x0201_4b50;
const END_OF_CENTRAL: u32 = 0x0605_4b50;
const FLAG_UTF8: u16 = 1 << 11;
const STORED: u16 = 0;
const DEFLATED: u16 = 8;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;
const S_IFMT: u32 = 0o170000;

struct CentralEntry {
    name: String,
    method: u16,
    crc: u32,
    compressed: u32,
    size: u32,
    offset: u32,
    mode: u32,
    mtime: u32,
}

/// Writes a zip archive member by member; [`ZipWriter::finish`] writes the central directory.
pub struct ZipWriter<W: Write + Seek> {
    out: W,
    entries: Vec<CentralEntry>,
}

fn too_big(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{what} needs zip64, which podfleet's archiver does not write (keep archives and members under 4 GiB)"
        ),
    )
}

struct Counting<'a, W: Write> {
    inner: &'a mut W,
    written: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write + Seek> ZipWriter<W> {
    pub fn new(out: W) -> Self {
        ZipWriter {
            out,
            entries: Vec::new(),
        }
    }

    /// Adds the file system entry at `path` as member `name` (directories end in `/`).
    pub fn add_path(&mut self, path: &Path, name: &str) -> io::Result<()> {
        let meta = fs::symlink_metadata(path)?;
        let mtime = u32::try_from(meta.mtime().max(0)).unwrap_or(u32::MAX);
        let permissions = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(path)?;
            let target = target.to_string_lossy().into_owned();
            self.add_bytes(name, S_IFLNK | 0o777, mtime, target.as_bytes(), STORED)
        } else if meta.is_dir() {
            let name = format!("{}/", name.trim_end_matches('/'));
            self.add_bytes(&name, S_IFDIR | permissions, mtime, b"", STORED)
        } else {
            let mut file = fs::File::open(path)?;
            self.add_reader(name, S_IFREG | permissions, mtime, &mut file)
        }
    }

    fn add_bytes(
        &mut self,
        name: &str,
        mode: u32,
        mtime: u32,
        contents: &[u8],
        method: u16,
    ) -> io::Result<()> {
        let size = u32::try_from(contents.len()).map_err(|_| too_big(name))?;
        let crc = crc32fast::hash(contents);
        let offset = self.write_local_header(name, method, crc, size, size, mtime)?;
        self.out.write_all(contents)?;
        self.entries.push(CentralEntry {
            name: name.to_owned(),
            method,
            crc,
            compressed: size,
            size,
            offset,
            mode,
            mtime,
        });
        Ok(())
    }

    fn add_reader(
        &mut self,
        name: &str,
        mode: u32,
        mtime: u32,
        reader: &mut impl Read,
    ) -> io::Result<()> {
        let offset = self.write_local_header(name, DEFLATED, 0, 0, 0, mtime)?;
        let data_start = self.out.stream_position()?;
        let mut hasher = crc32fast::Hasher::new();
        let mut size: u64 = 0;
        let mut counting = Counting {
            inner: &mut self.out,
            written: 0,
        };
        {
            let mut encoder = DeflateEncoder::new(&mut counting, Compression::default());
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                let n = reader.read(&mut buffer)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buffer[..n]);
                size += n as u64;
                encoder.write_all(&buffer[..n])?;
            }
            encoder.finish()?;
        }
        let compressed = counting.written;
        let size = u32::try_from(size).map_err(|_| too_big(name))?;
        let compressed = u32::try_from(compressed).map_err(|_| too_big(name))?;
        let crc = hasher.finalize();
        // Patch crc and sizes into the local header now that they are known.
        let end = self.out.stream_position()?;
        self.out.seek(SeekFrom::Start(u64::from(offset) + 14))?;
        self.out.write_all(&crc.to_le_bytes())?;
        self.out.write_all(&compressed.to_le_bytes())?;
        self.out.write_all(&size.to_le_bytes())?;
        self.out.seek(SeekFrom::Start(end))?;
        debug_assert_eq!(end - data_start, u64::from(compressed));
        self.entries.push(CentralEntry {
            name: name.to_owned(),
            method: DEFLATED,
            crc,
            compressed,
            size,
            offset,
            mode,
            mtime,
        });
        Ok(())
    }

    fn write_local_header(
        &mut self,
        name: &str,
        method: u16,
        crc: u32,
        compressed: u32,
        size: u32,
        mtime: u32,
    ) -> io::Result<u32> {
        let offset =
            u32::try_from(self.out.stream_position()?).map_err(|_| too_big("the archive"))?;
        let (time, date) = dos_time(mtime);
        let extra = timestamp_extra(mtime);
        let mut header = Vec::with_capacity(30 + name.len() + extra.len());
        header.extend_from_slice(&LOCAL_HEADER.to_le_bytes());
        header.extend_from_slice(&20u16.to_le_bytes());
        header.extend_from_slice(&FLAG_UTF8.to_le_bytes());
        header.extend_from_slice(&method.to_le_bytes());
        header.extend_from_slice(&time.to_le_bytes());
        header.extend_from_slice(&date.to_le_bytes());
        header.extend_from_slice(&crc.to_le_bytes());
        header.extend_from_slice(&compressed.to_le_bytes());
        header.extend_from_slice(&size.to_le_bytes());
        header.extend_from_slice(&(name.len() as u16).to_le_bytes());
        header.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        header.extend_from_slice(name.as_bytes());
        header.extend_from_slice(&extra);
        self.out.write_all(&header)?;
        Ok(offset)
    }

    /// Writes the central directory and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        let start = self.out.stream_position()?;
        let count =
            u16::try_from(self.entries.len()).map_err(|_| too_big("more than 65535 members"))?;
        for entry in &self.entries {
            let (time, date) = dos_time(entry.mtime);
            let extra = timestamp_extra(entry.mtime);
            let mut header = Vec::with_capacity(46 + entry.name.len() + extra.len());
            header.extend_from_slice(&CENTRAL_HEADER.to_le_bytes());
            header.extend_from_slice(&((3u16 << 8) | 20).to_le_bytes());
            header.extend_from_slice(&20u16.to_le_bytes());
            header.extend_from_slice(&FLAG_UTF8.to_le_bytes());
            header.extend_from_slice(&entry.method.to_le_bytes());
            header.extend_from_slice(&time.to_le_bytes());
            header.extend_from_slice(&date.to_le_bytes());
            header.extend_from_slice(&entry.crc.to_le_bytes());
            header.extend_from_slice(&entry.compressed.to_le_bytes());
            header.extend_from_slice(&entry.size.to_le_bytes());
            header.extend_from_slice(&(entry.name.len() as u16).to_le_bytes());
            header.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            header.extend_from_slice(&0u16.to_le_bytes());
            header.extend_from_slice(&0u16.to_le_bytes());
            header.extend_from_slice(&0u16.to_le_bytes());
            let dos_dir = if entry.mode & S_IFMT == S_IFDIR {
                0x10
            } else {
                0
            };
            header.extend_from_slice(&((entry.mode << 16) | dos_dir).to_le_bytes());
            header.extend_from_slice(&entry.offset.to_le_bytes());
            header.extend_from_slice(entry.name.as_bytes());
            header.extend_from_slice(&extra);
            self.out.write_all(&header)?;
        }
        let end = self.out.stream_position()?;
        let size = u32::try_from(end - start).map_err(|_| too_big("the central directory"))?;
        let start = u32::try_from(start).map_err(|_| too_big("the archive"))?;
        let mut eocd = Vec::with_capacity(22);
        eocd.extend_from_slice(&END_OF_CENTRAL.to_le_bytes());
        eocd.extend_from_slice(&[0; 4]);
        eocd.extend_from_slice(&count.to_le_bytes());
        eocd.extend_from_slice(&count.to_le_bytes());
        eocd.extend_from_slice(&size.to_le_bytes());
        eocd.extend_from_slice(&start.to_le_bytes());
        eocd.extend_from_slice(&0u16.to_le_bytes());
        self.out.write_all(&eocd)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The "extended timestamp" extra field (0x5455) with the modification time.
fn timestamp_extra(mtime: u32) -> Vec<u8> {
    let mut extra = Vec::with_capacity(9);
    extra.extend_from_slice(&0x5455u16.to_le_bytes());
    extra.extend_from_slice(&5u16.to_le_bytes());
    extra.push(1);
    extra.extend_from_slice(&mtime.to_le_bytes());
    extra
}

/// MS-DOS time and date of a Unix time (UTC), clamped to DOS's 1980 epoch.
fn dos_time(unix: u32) -> (u16, u16) {
    use chrono::{Datelike, Timelike};
    let Some(time) = chrono::DateTime::from_timestamp(i64::from(unix), 0) else {
        return (0, 0x21);
    };
    if time.year() < 1980 {
        return (0, 0x21);
    }
    let dos_time = ((time.hour() << 11) | (time.minute() << 5) | (time.second() / 2)) as u16;
    let dos_date = ((((time.year() - 1980) as u32) << 9) | (time.month() << 5) | time.day()) as u16;
    (dos_time, dos_date)
}

/// One member as the central directory describes it.
#[derive(Debug, Clone)]
pub struct ZipMember {
    pub name: String,
    method: u16,
    crc: u32,
    compressed: u64,
    pub size: u64,
    offset: u64,
    /// Unix mode (type and permissions), 0 when the archive has none.
    pub mode: u32,
}

impl ZipMember {
    pub fn is_dir(&self) -> bool {
        self.name.ends_with('/') || self.mode & S_IFMT == S_IFDIR
    }

    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Reads a zip archive's central directory.
pub fn members<R: Read + Seek>(archive: &mut R) -> io::Result<Vec<ZipMember>> {
    let length = archive.seek(SeekFrom::End(0))?;
    let tail_length = length.min(22 + 65535);
    archive.seek(SeekFrom::Start(length - tail_length))?;
    let mut tail = vec![0u8; tail_length as usize];
    archive.read_exact(&mut tail)?;
    let eocd = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|at| tail[*at..*at + 4] == END_OF_CENTRAL.to_le_bytes())
        .ok_or_else(|| invalid("not a zip archive (no end of central directory)".to_owned()))?;
    let record = &tail[eocd..];
    let u16_at = |bytes: &[u8], at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let u32_at = |bytes: &[u8], at: usize| {
        u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
    };
    let count = u16_at(record, 10);
    let size = u32_at(record, 12);
    let start = u32_at(record, 16);
    if count == 0xFFFF || size == 0xFFFF_FFFF || start == 0xFFFF_FFFF {
        return Err(invalid(
            "zip64 archives are not supported by podfleet's extractor".to_owned(),
        ));
    }
    archive.seek(SeekFrom::Start(u64::from(start)))?;
    let mut directory = vec![0u8; size as usize];
    archive.read_exact(&mut directory)?;
    let mut members = Vec::with_capacity(usize::from(count));
    let mut at = 0;
    for _ in 0..count {
        if directory.len() < at + 46 || u32_at(&directory, at) != CENTRAL_HEADER {
            return Err(invalid("corrupt zip central directory".to_owned()));
        }
        let made_by_unix = directory[at + 5] == 3;
        let name_length = usize::from(u16_at(&directory, at + 28));
        let extra_length = usize::from(u16_at(&directory, at + 30));
        let comment_length = usize::from(u16_at(&directory, at + 32));
        let external = u32_at(&directory, at + 38);
        let name_end = at + 46 + name_length;
        if directory.len() < name_end + extra_length + comment_length {
            return Err(invalid("corrupt zip central directory".to_owned()));
        }
        let name = String::from_utf8_lossy(&directory[at + 46..name_end]).into_owned();
        members.push(ZipMember {
            name,
            method: u16_at(&directory, at + 10),
            crc: u32_at(&directory, at + 16),
            compressed: u64::from(u32_at(&directory, at + 20)),
            size: u64::from(u32_at(&directory, at + 24)),
            offset: u64::from(u32_at(&directory, at + 42)),
            mode: if made_by_unix { external >> 16 } else { 0 },
        });
        at = name_end + extra_length + comment_length;
    }
    Ok(members)
}

/// A reader of one member's uncompressed bytes, checked against its CRC at the end.
fn open_member<'a, R: Read + Seek>(
    archive: &'a mut R,
    member: &ZipMember,
) -> io::Result<Box<dyn Read + 'a>> {
    archive.seek(SeekFrom::Start(member.offset))?;
    let mut header = [0u8; 30];
    archive.read_exact(&mut header)?;
    if header[..4] != LOCAL_HEADER.to_le_bytes() {
        return Err(invalid(format!(
            "corrupt zip: no local header for {}",
            member.name
        )));
    }
    let name_length = u16::from_le_bytes([header[26], header[27]]);
    let extra_length = u16::from_le_bytes([header[28], header[29]]);
    archive.seek(SeekFrom::Current(
        i64::from(name_length) + i64::from(extra_length),
    ))?;
    let raw = archive.take(member.compressed);
    let reader: Box<dyn Read + 'a> = match member.method {
        STORED => Box::new(raw),
        DEFLATED => Box::new(DeflateDecoder::new(raw)),
        other => {
            return Err(invalid(format!(
                "zip member {} uses compression method {other}; only stored and deflated are supported",
                member.name
            )));
        }
    };
    Ok(Box::new(CrcCheck {
        inner: reader.take(member.size),
        hasher: crc32fast::Hasher::new(),
        expected: member.crc,
        name: member.name.clone(),
    }))
}

struct CrcCheck<R> {
    inner: R,
    hasher: crc32fast::Hasher,
    expected: u32,
    name: String,
}

impl<R: Read> Read for CrcCheck<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let actual = self.hasher.clone().finalize();
            if actual != self.expected {
                return Err(invalid(format!(
                    "zip member {} fails its CRC check",
                    self.name
                )));
            }
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// What extraction did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub files: usize,
    pub directories: usize,
    pub symlinks: usize,
}

/// Extracts every member of `archive` under `root`. A member that would land outside `root`
/// (a `..` or absolute name, a path through a symlink, a symlink pointing out) fails the
/// extraction before anything is written for it.
pub fn extract<R: Read + Seek>(archive: &mut R, root: &Path) -> io::Result<Extracted> {
    let members = members(archive)?;
    let mut extracted = Extracted::default();
    for member in &members {
        let parts = paths::member_parts(&member.name)
            .map_err(|message| io::Error::new(io::ErrorKind::PermissionDenied, message))?;
        if member.is_dir() {
            let path = paths::prepare_member(root, &parts, true)?;
            if member.mode & 0o777 != 0 {
                fs::set_permissions(
                    &path,
                    fs::Permissions::from_mode((member.mode & 0o777) | 0o700),
                )?;
            }
            extracted.directories += 1;
        } else if member.is_symlink() {
            let mut target = String::new();
            open_member(archive, member)?
                .take(4096)
                .read_to_string(&mut target)?;
            if !paths::symlink_stays_inside(&parts, &target) {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "archive member {} is a symlink to {target:?}, outside the build directory",
                        member.name
                    ),
                ));
            }
            let path = paths::prepare_member(root, &parts, false)?;
            std::os::unix::fs::symlink(&target, &path)?;
            extracted.symlinks += 1;
        } else {
            let path = paths::prepare_member(root, &parts, false)?;
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?;
            io::copy(&mut open_member(archive, member)?, &mut file)?;
            let mode = if member.mode & 0o777 == 0 {
                0o644
            } else {
                member.mode & 0o777
            };
            file.set_permissions(fs::Permissions::from_mode(mode))?;
            extracted.files += 1;
        }
    }
    Ok(extracted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn a_written_archive_reads_back_and_unzip_accepts_it() {
        let source = tempfile::tempdir().unwrap();
        fs::create_dir(source.path().join("dir")).unwrap();
        fs::write(source.path().join("dir/a.txt"), "hello ".repeat(1000)).unwrap();
        fs::write(source.path().join("empty"), "").unwrap();
        std::os::unix::fs::symlink("dir/a.txt", source.path().join("link")).unwrap();
        let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
        for name in ["dir", "dir/a.txt", "empty", "link"] {
            zip.add_path(&source.path().join(name), name).unwrap();
        }
        let mut archive = zip.finish().unwrap();
        let listed = members(&mut archive).unwrap();
        let names: Vec<_> = listed.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["dir/", "dir/a.txt", "empty", "link"]);

        let target = tempfile::tempdir().unwrap();
        let extracted = extract(&mut archive, target.path()).unwrap();
        assert_eq!(
            extracted,
            Extracted {
                files: 2,
                directories: 1,
                symlinks: 1
            }
        );
        assert_eq!(
            fs::read_to_string(target.path().join("link")).unwrap(),
            "hello ".repeat(1000)
        );

        // Info-ZIP's unzip is the reference reader, when installed.
        let file = target.path().join("check.zip");
        fs::write(&file, archive.into_inner()).unwrap();
        if let Ok(output) = std::process::Command::new("unzip")
            .arg("-t")
            .arg(&file)
            .output()
        {
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stdout)
            );
        }
    }

    #[test]
    fn a_corrupted_member_fails_its_crc() {
        let source = tempfile::tempdir().unwrap();
        fs::write(source.path().join("a"), "abcdefgh").unwrap();
        let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
        zip.add_bytes("a", S_IFREG | 0o644, 0, b"abcdefgh", STORED)
            .unwrap();
        let mut bytes = zip.finish().unwrap().into_inner();
        let at = bytes.windows(8).position(|w| w == b"abcdefgh").unwrap();
        bytes[at] = b'X';
        let target = tempfile::tempdir().unwrap();
        let error = extract(&mut Cursor::new(bytes), target.path()).unwrap_err();
        assert!(error.to_string().contains("CRC"), "{error}");
    }
}
