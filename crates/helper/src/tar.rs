//! A minimal ustar writer for the helper image: directories, regular files and symbolic
//! links, with fixed owner (root) and time (0), so equal inputs give byte-equal archives and
//! thus equal image IDs.

use std::io::{self, Write};

const BLOCK: usize = 512;

/// Writes ustar entries to `out`; [`TarWriter::finish`] writes the end-of-archive blocks.
pub struct TarWriter<W: Write> {
    out: W,
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> Self {
        TarWriter { out }
    }

    pub fn directory(&mut self, path: &str, mode: u32) -> io::Result<()> {
        let name = format!("{}/", path.trim_end_matches('/'));
        self.header(&name, mode, 0, b'5', "")
    }

    pub fn file(&mut self, path: &str, mode: u32, contents: &[u8]) -> io::Result<()> {
        self.header(path, mode, contents.len() as u64, b'0', "")?;
        self.out.write_all(contents)?;
        let padding = (BLOCK - contents.len() % BLOCK) % BLOCK;
        self.out.write_all(&[0; BLOCK][..padding])
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.header(path, 0o777, 0, b'2', target)
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0; 2 * BLOCK])?;
        Ok(self.out)
    }

    fn header(&mut self, path: &str, mode: u32, size: u64, kind: u8, link: &str) -> io::Result<()> {
        let path = path.trim_start_matches('/');
        let mut header = [0u8; BLOCK];
        let (prefix, name) = split_name(path)?;
        if link.len() > 100 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("symlink target {link} is longer than ustar's 100 bytes"),
            ));
        }
        put(&mut header, 0, name.as_bytes());
        put(&mut header, 100, format!("{mode:07o}\0").as_bytes());
        put(&mut header, 108, b"0000000\0");
        put(&mut header, 116, b"0000000\0");
        put(&mut header, 124, format!("{size:011o}\0").as_bytes());
        put(&mut header, 136, b"00000000000\0");
        header[148..156].fill(b' ');
        header[156] = kind;
        put(&mut header, 157, link.as_bytes());
        put(&mut header, 257, b"ustar\x0000");
        put(&mut header, 265, b"root");
        put(&mut header, 297, b"root");
        put(&mut header, 345, prefix.as_bytes());
        let checksum: u32 = header.iter().map(|byte| u32::from(*byte)).sum();
        put(&mut header, 148, format!("{checksum:06o}\0 ").as_bytes());
        self.out.write_all(&header)
    }
}

fn put(header: &mut [u8; BLOCK], at: usize, bytes: &[u8]) {
    header[at..at + bytes.len()].copy_from_slice(bytes);
}

/// ustar's name (100 bytes) and prefix (155 bytes), split at a `/`.
fn split_name(path: &str) -> io::Result<(&str, &str)> {
    if path.len() <= 100 {
        return Ok(("", path));
    }
    let too_long = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("path {path} is too long for a ustar header"),
        )
    };
    let split = path
        .char_indices()
        .filter(|(at, c)| *c == '/' && *at <= 155 && path.len() - at - 1 <= 100)
        .map(|(at, _)| at)
        .next()
        .ok_or_else(too_long)?;
    Ok((&path[..split], &path[split + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_block_aligned_with_valid_checksums() {
        let mut tar = TarWriter::new(Vec::new());
        tar.directory("etc", 0o755).unwrap();
        tar.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n")
            .unwrap();
        tar.symlink("bin/sh", "busybox").unwrap();
        let bytes = tar.finish().unwrap();
        assert_eq!(bytes.len() % BLOCK, 0);
        assert_eq!(bytes.len(), BLOCK * (1 + 2 + 1 + 2));
        for header in [
            &bytes[0..BLOCK],
            &bytes[BLOCK..2 * BLOCK],
            &bytes[3 * BLOCK..4 * BLOCK],
        ] {
            let stored =
                u32::from_str_radix(std::str::from_utf8(&header[148..154]).unwrap(), 8).unwrap();
            let mut copy = header.to_vec();
            copy[148..156].fill(b' ');
            assert_eq!(stored, copy.iter().map(|b| u32::from(*b)).sum::<u32>());
        }
        assert_eq!(&bytes[0..4], b"etc/");
        assert_eq!(&bytes[2 * BLOCK..2 * BLOCK + 9], b"127.0.0.1");
    }

    #[test]
    fn long_paths_use_the_prefix_field() {
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(50));
        let (prefix, name) = split_name(&long).unwrap();
        assert_eq!(prefix.len(), 120);
        assert_eq!(name.len(), 50);
        assert!(split_name(&"x".repeat(300)).is_err());
    }
}
