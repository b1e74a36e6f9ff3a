//! Zip archives as gitlab-runner writes them for artifacts and caches: deflated files,
//! stored directories and symlinks, Unix modes in the external attributes, the extended
//! timestamp extra field, UTF-8 names; and a reader that extracts into a root through
//! [`crate::paths`] so that no member lands outside it.
//!
//! Past zip's 32-bit limits (a member or archive of 4 GiB or more, 65,535 members or more)
//! both sides use zip64 fields and records, as Go's `archive/zip` does for gitlab-runner.

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
const ZIP64_END_OF_CENTRAL: u32 = 0x0606_4b50;
const ZIP64_LOCATOR: u32 = 0x0706_4b50;
/// The zip64 extended information extra field.
const ZIP64_EXTRA: u16 = 0x0001;
/// A 32-bit field holding this says "see the zip64 field".
const MAX_U32: u32 = 0xFFFF_FFFF;
const MAX_U16: u16 = 0xFFFF;
/// Sizes and offsets from this value on go into zip64 fields.
const ZIP64_LIMIT: u64 = MAX_U32 as u64;
/// "Version needed to extract" without and with zip64.
const VERSION: u16 = 20;
const VERSION_ZIP64: u16 = 45;
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
    compressed: u64,
    size: u64,
    offset: u64,
    mode: u32,
    mtime: u32,
}

/// Writes a zip archive member by member; [`ZipWriter::finish`] writes the central directory.
pub struct ZipWriter<W: Write + Seek> {
    out: W,
    entries: Vec<CentralEntry>,
    /// [`ZIP64_LIMIT`]; lower in tests, to exercise zip64 without writing 4 GiB.
    limit: u64,
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
            limit: ZIP64_LIMIT,
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
            self.add_reader(name, S_IFREG | permissions, mtime, meta.len(), &mut file)
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
        let size = contents.len() as u64;
        let crc = crc32fast::hash(contents);
        let zip64 = size >= self.limit;
        let offset = self.write_local_header(name, method, crc, size, mtime, zip64)?;
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

    /// Deflates `reader`, of about `expected` bytes, as member `name`.
    fn add_reader(
        &mut self,
        name: &str,
        mode: u32,
        mtime: u32,
        expected: u64,
        reader: &mut impl Read,
    ) -> io::Result<()> {
        // The local header is written before the sizes are known: it gets zip64 fields when
        // the data could reach the limit (deflate can add a little to incompressible data).
        let zip64 = expected.saturating_add(expected / 64 + 64 * 1024) >= self.limit;
        let offset = self.write_local_header(name, DEFLATED, 0, 0, mtime, zip64)?;
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
        if !zip64 && (size >= self.limit || compressed >= self.limit) {
            return Err(io::Error::other(format!(
                "{name} grew past 4 GiB while it was archived ({expected} bytes when it was opened)"
            )));
        }
        let crc = hasher.finalize();
        // Patch crc and sizes into the local header now that they are known.
        let end = self.out.stream_position()?;
        self.out.seek(SeekFrom::Start(offset + 14))?;
        self.out.write_all(&crc.to_le_bytes())?;
        if zip64 {
            // After the fixed header and the name: the extra field's id and length, then
            // the uncompressed and compressed sizes.
            self.out
                .seek(SeekFrom::Start(offset + 30 + name.len() as u64 + 4))?;
            self.out.write_all(&size.to_le_bytes())?;
            self.out.write_all(&compressed.to_le_bytes())?;
        } else {
            self.out.write_all(&(compressed as u32).to_le_bytes())?;
            self.out.write_all(&(size as u32).to_le_bytes())?;
        }
        self.out.seek(SeekFrom::Start(end))?;
        debug_assert_eq!(end - data_start, compressed);
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

    /// Writes a local header for data of `size` bytes both ways (the sizes are patched in
    /// later for deflated data); with `zip64`, the sizes go into a zip64 extra field, first
    /// among the extra fields. Returns the header's offset.
    fn write_local_header(
        &mut self,
        name: &str,
        method: u16,
        crc: u32,
        size: u64,
        mtime: u32,
        zip64: bool,
    ) -> io::Result<u64> {
        let offset = self.out.stream_position()?;
        let (time, date) = dos_time(mtime);
        let mut extra = Vec::new();
        let (version, size32) = if zip64 {
            extra.extend_from_slice(&ZIP64_EXTRA.to_le_bytes());
            extra.extend_from_slice(&16u16.to_le_bytes());
            extra.extend_from_slice(&size.to_le_bytes());
            extra.extend_from_slice(&size.to_le_bytes());
            (VERSION_ZIP64, MAX_U32)
        } else {
            (VERSION, size as u32)
        };
        extra.extend_from_slice(&timestamp_extra(mtime));
        let mut header = Vec::with_capacity(30 + name.len() + extra.len());
        header.extend_from_slice(&LOCAL_HEADER.to_le_bytes());
        header.extend_from_slice(&version.to_le_bytes());
        header.extend_from_slice(&FLAG_UTF8.to_le_bytes());
        header.extend_from_slice(&method.to_le_bytes());
        header.extend_from_slice(&time.to_le_bytes());
        header.extend_from_slice(&date.to_le_bytes());
        header.extend_from_slice(&crc.to_le_bytes());
        header.extend_from_slice(&size32.to_le_bytes());
        header.extend_from_slice(&size32.to_le_bytes());
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
        for entry in &self.entries {
            // Each field past the limit is 0xFFFFFFFF here and follows in the zip64 extra
            // field, in the order the format fixes.
            let mut wide = Vec::new();
            let mut narrow = |value: u64| {
                if value >= self.limit {
                    wide.extend_from_slice(&value.to_le_bytes());
                    MAX_U32
                } else {
                    value as u32
                }
            };
            let size = narrow(entry.size);
            let compressed = narrow(entry.compressed);
            let offset = narrow(entry.offset);
            let mut extra = Vec::new();
            let version = if wide.is_empty() {
                VERSION
            } else {
                extra.extend_from_slice(&ZIP64_EXTRA.to_le_bytes());
                extra.extend_from_slice(&(wide.len() as u16).to_le_bytes());
                extra.extend_from_slice(&wide);
                VERSION_ZIP64
            };
            extra.extend_from_slice(&timestamp_extra(entry.mtime));
            let (time, date) = dos_time(entry.mtime);
            let mut header = Vec::with_capacity(46 + entry.name.len() + extra.len());
            header.extend_from_slice(&CENTRAL_HEADER.to_le_bytes());
            header.extend_from_slice(&((3u16 << 8) | version).to_le_bytes());
            header.extend_from_slice(&version.to_le_bytes());
            header.extend_from_slice(&FLAG_UTF8.to_le_bytes());
            header.extend_from_slice(&entry.method.to_le_bytes());
            header.extend_from_slice(&time.to_le_bytes());
            header.extend_from_slice(&date.to_le_bytes());
            header.extend_from_slice(&entry.crc.to_le_bytes());
            header.extend_from_slice(&compressed.to_le_bytes());
            header.extend_from_slice(&size.to_le_bytes());
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
            header.extend_from_slice(&offset.to_le_bytes());
            header.extend_from_slice(entry.name.as_bytes());
            header.extend_from_slice(&extra);
            self.out.write_all(&header)?;
        }
        let end = self.out.stream_position()?;
        let count = self.entries.len() as u64;
        let size = end - start;
        let zip64 = count >= u64::from(MAX_U16) || size >= self.limit || start >= self.limit;
        if zip64 {
            let mut record = Vec::with_capacity(56 + 20);
            record.extend_from_slice(&ZIP64_END_OF_CENTRAL.to_le_bytes());
            record.extend_from_slice(&44u64.to_le_bytes());
            record.extend_from_slice(&((3u16 << 8) | VERSION_ZIP64).to_le_bytes());
            record.extend_from_slice(&VERSION_ZIP64.to_le_bytes());
            record.extend_from_slice(&[0; 8]);
            record.extend_from_slice(&count.to_le_bytes());
            record.extend_from_slice(&count.to_le_bytes());
            record.extend_from_slice(&size.to_le_bytes());
            record.extend_from_slice(&start.to_le_bytes());
            record.extend_from_slice(&ZIP64_LOCATOR.to_le_bytes());
            record.extend_from_slice(&0u32.to_le_bytes());
            record.extend_from_slice(&end.to_le_bytes());
            record.extend_from_slice(&1u32.to_le_bytes());
            self.out.write_all(&record)?;
        }
        let count16 = if zip64 { MAX_U16 } else { count as u16 };
        let (size32, start32) = if zip64 {
            (MAX_U32, MAX_U32)
        } else {
            (size as u32, start as u32)
        };
        let mut eocd = Vec::with_capacity(22);
        eocd.extend_from_slice(&END_OF_CENTRAL.to_le_bytes());
        eocd.extend_from_slice(&[0; 4]);
        eocd.extend_from_slice(&count16.to_le_bytes());
        eocd.extend_from_slice(&count16.to_le_bytes());
        eocd.extend_from_slice(&size32.to_le_bytes());
        eocd.extend_from_slice(&start32.to_le_bytes());
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
    let mut count = u64::from(u16_at(record, 10));
    let mut size = u64::from(u32_at(record, 12));
    let mut start = u64::from(u32_at(record, 16));
    if count == u64::from(MAX_U16) || size == ZIP64_LIMIT || start == ZIP64_LIMIT {
        // The zip64 end record, found through the locator just before the end record.
        let eocd_at = length - tail_length + eocd as u64;
        let locator = eocd
            .checked_sub(20)
            .map(|at| &tail[at..eocd])
            .filter(|locator| u32_at(locator, 0) == ZIP64_LOCATOR)
            .ok_or_else(|| {
                invalid("corrupt zip: zip64 fields without a zip64 end locator".to_owned())
            })?;
        let record_at = u64_at(locator, 8);
        if record_at.saturating_add(56) > eocd_at {
            return Err(invalid("corrupt zip: bad zip64 end locator".to_owned()));
        }
        archive.seek(SeekFrom::Start(record_at))?;
        let mut record = [0u8; 56];
        archive.read_exact(&mut record)?;
        if u32_at(&record, 0) != ZIP64_END_OF_CENTRAL {
            return Err(invalid("corrupt zip: no zip64 end record".to_owned()));
        }
        count = u64_at(&record, 32);
        size = u64_at(&record, 40);
        start = u64_at(&record, 48);
    }
    if start.saturating_add(size) > length {
        return Err(invalid(
            "corrupt zip: the central directory lies past the end".to_owned(),
        ));
    }
    archive.seek(SeekFrom::Start(start))?;
    let mut directory = vec![0u8; size as usize];
    archive.read_exact(&mut directory)?;
    // Each entry takes at least 46 bytes: a claimed count cannot make us allocate more.
    let mut members = Vec::with_capacity((count as usize).min(directory.len() / 46));
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
        let mut member = ZipMember {
            name,
            method: u16_at(&directory, at + 10),
            crc: u32_at(&directory, at + 16),
            compressed: u64::from(u32_at(&directory, at + 20)),
            size: u64::from(u32_at(&directory, at + 24)),
            offset: u64::from(u32_at(&directory, at + 42)),
            mode: if made_by_unix { external >> 16 } else { 0 },
        };
        widen(&mut member, &directory[name_end..name_end + extra_length])?;
        members.push(member);
        at = name_end + extra_length + comment_length;
    }
    Ok(members)
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"))
}

/// Replaces the member's 32-bit fields that say "see zip64" with the values from the zip64
/// extra field, which holds exactly those, in the order size, compressed size, offset.
fn widen(member: &mut ZipMember, mut extra: &[u8]) -> io::Result<()> {
    let name = member.name.clone();
    let mut fields: Vec<&mut u64> = [&mut member.size, &mut member.compressed, &mut member.offset]
        .into_iter()
        .filter(|field| **field == ZIP64_LIMIT)
        .collect();
    if fields.is_empty() {
        return Ok(());
    }
    while extra.len() >= 4 {
        let id = u16_at(extra, 0);
        let length = usize::from(u16_at(extra, 2));
        let data = extra
            .get(4..4 + length)
            .ok_or_else(|| invalid(format!("corrupt zip: bad extra field in {name}")))?;
        if id == ZIP64_EXTRA {
            if data.len() < 8 * fields.len() {
                return Err(invalid(format!("corrupt zip: short zip64 field in {name}")));
            }
            for (index, field) in fields.iter_mut().enumerate() {
                **field = u64_at(data, 8 * index);
            }
            return Ok(());
        }
        extra = &extra[4 + length..];
    }
    Err(invalid(format!(
        "corrupt zip: {name} has zip64 sizes but no zip64 field"
    )))
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

        independent_readers_accept(&archive.into_inner(), 4);
    }

    /// Info-ZIP's unzip and Python's zipfile, each when installed, test every member.
    fn independent_readers_accept(bytes: &[u8], count: usize) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("check.zip");
        fs::write(&file, bytes).unwrap();
        if let Ok(output) = std::process::Command::new("unzip")
            .arg("-tqq")
            .arg(&file)
            .output()
        {
            assert!(
                output.status.success(),
                "unzip: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let script = "import sys, zipfile\n\
                      z = zipfile.ZipFile(sys.argv[1])\n\
                      bad = z.testzip()\n\
                      assert bad is None, bad\n\
                      print(len(z.namelist()))";
        if let Ok(output) = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&file)
            .output()
        {
            assert!(
                output.status.success(),
                "python zipfile: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&output.stdout).trim(),
                count.to_string()
            );
        }
    }

    #[test]
    fn more_than_65535_members_get_a_zip64_end_record() {
        let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
        for index in 0..70_000 {
            let name = format!("node_modules/{index}");
            zip.add_bytes(&name, S_IFREG | 0o644, 0, b"x", STORED)
                .unwrap();
        }
        let mut archive = zip.finish().unwrap();
        let listed = members(&mut archive).unwrap();
        assert_eq!(listed.len(), 70_000);
        assert_eq!(listed[69_999].name, "node_modules/69999");
        let bytes = archive.into_inner();
        assert!(
            bytes
                .windows(4)
                .any(|w| w == ZIP64_END_OF_CENTRAL.to_le_bytes())
        );
        independent_readers_accept(&bytes, 70_000);
    }

    /// Sizes and offsets past the limit (lowered here, to stay off 4 GiB of test data) go
    /// into zip64 fields that podfleet's reader and the independent readers all follow.
    #[test]
    fn sizes_and_offsets_past_the_limit_use_zip64_fields() {
        let source = tempfile::tempdir().unwrap();
        let big = "a line that repeats and compresses well\n".repeat(200);
        fs::write(source.path().join("big.txt"), &big).unwrap();
        fs::write(source.path().join("small"), "tiny").unwrap();
        fs::create_dir(source.path().join("dir")).unwrap();
        std::os::unix::fs::symlink("../big.txt", source.path().join("dir/link")).unwrap();
        let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
        zip.limit = 100;
        for name in ["big.txt", "small", "dir", "dir/link"] {
            zip.add_path(&source.path().join(name), name).unwrap();
        }
        let mut archive = zip.finish().unwrap();
        let listed = members(&mut archive).unwrap();
        let sizes: Vec<(&str, u64)> = listed.iter().map(|m| (m.name.as_str(), m.size)).collect();
        assert_eq!(
            sizes,
            [
                ("big.txt", big.len() as u64),
                ("small", 4),
                ("dir/", 0),
                ("dir/link", 10)
            ]
        );
        // The big member is at offset 0 with small sizes in zip64 fields; the later ones sit
        // past the limit and need zip64 offsets.
        assert!(listed[1].offset >= 100 && listed[3].offset > listed[1].offset);
        let target = tempfile::tempdir().unwrap();
        extract(&mut archive, target.path()).unwrap();
        assert_eq!(
            fs::read_to_string(target.path().join("dir/link")).unwrap(),
            big
        );
        assert_eq!(
            fs::read_to_string(target.path().join("small")).unwrap(),
            "tiny"
        );
        let bytes = archive.into_inner();
        assert!(
            bytes
                .windows(4)
                .any(|w| w == ZIP64_END_OF_CENTRAL.to_le_bytes())
        );
        independent_readers_accept(&bytes, 4);
    }

    #[test]
    fn a_zip64_size_without_its_field_is_refused() {
        let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
        zip.add_bytes("a", S_IFREG | 0o644, 0, b"abc", STORED)
            .unwrap();
        let mut bytes = zip.finish().unwrap().into_inner();
        // Claim a zip64 size in the central entry without adding the field.
        let central = bytes
            .windows(4)
            .position(|w| w == CENTRAL_HEADER.to_le_bytes())
            .unwrap();
        bytes[central + 24..central + 28].copy_from_slice(&MAX_U32.to_le_bytes());
        let error = members(&mut Cursor::new(bytes)).unwrap_err();
        assert!(error.to_string().contains("no zip64 field"), "{error}");
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
