//! Reading an image source (a directory or a tar archive) into a manifest and its contents.
//!
//! Everything an archive says is checked before anything is sent: paths must be relative and
//! stay inside the tree, nothing may lie under a symlink, hard links must name files of the
//! tree, names must be UTF-8, special files are refused, and a truncated or corrupt archive is
//! an error. Archive contents are spooled to a temporary directory while they are hashed, so
//! they are read once and never held in memory whole; a directory is read by the agent's
//! scanner (`dom_agent::scan`), strict, its contents hashed in parallel where they lie.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use dom_agent::scan::{scan_with_progress, Progress, ScanConfig};
use dom_storage::event::Hash;
use dom_storage::image::{normalize_path, Entry, Filter, Kind, Manifest};
use indicatif::ProgressBar;

/// An image read from its source: the manifest and where each object's bytes are.
pub struct Ingested {
    pub manifest: Manifest,
    pub contents: HashMap<Hash, PathBuf>,
    /// Paths the filter left out.
    pub filtered: u64,
}

const BUFFER: usize = 1 << 20;

fn utf8(raw: &[u8], what: &str) -> anyhow::Result<String> {
    String::from_utf8(raw.to_vec()).map_err(|_| {
        anyhow::anyhow!(
            "{what} {:?} is not valid UTF-8",
            String::from_utf8_lossy(raw)
        )
    })
}

/// Adds the directories an archive implies but does not list.
fn add_missing_parents(entries: &mut Vec<Entry>) {
    let present: BTreeSet<String> = entries.iter().map(|e| e.path.clone()).collect();
    let mut wanted = BTreeSet::new();
    for entry in entries.iter() {
        let mut path = entry.path.as_str();
        while let Some(i) = path.rfind('/') {
            path = if i == 0 { "/" } else { &path[..i] };
            if !present.contains(path) {
                wanted.insert(path.to_owned());
            }
            if path == "/" {
                break;
            }
        }
    }
    if !present.contains("/") {
        wanted.insert("/".to_owned());
    }
    entries.extend(wanted.iter().map(|p| Entry::directory(p, 0o755, 0, 0)));
}

/// Reads `source`: a directory, `.tar`, `.tar.gz`/`.tgz` or `.tar.zst`/`.tzst`.
pub fn read_source(
    source: &Path,
    filter: &Filter,
    spool: &Path,
    progress: &ProgressBar,
) -> anyhow::Result<Ingested> {
    let meta =
        std::fs::metadata(source).with_context(|| format!("reading {}", source.display()))?;
    if meta.is_dir() {
        return read_directory(source, filter, progress);
    }
    let name = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = BufReader::with_capacity(
        BUFFER,
        File::open(source).with_context(|| format!("opening {}", source.display()))?,
    );
    let reader: Box<dyn Read> = if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else if name.ends_with(".tar.zst") || name.ends_with(".tzst") {
        Box::new(zstd::Decoder::with_buffer(file).context("reading the zstd stream")?)
    } else if name.ends_with(".tar") {
        Box::new(file)
    } else {
        bail!(
            "{}: not a directory, .tar, .tar.gz or .tar.zst",
            source.display()
        );
    };
    read_archive(reader, filter, spool, progress)
        .with_context(|| format!("refusing {}", source.display()))
}

fn read_archive(
    reader: impl Read,
    filter: &Filter,
    spool: &Path,
    progress: &ProgressBar,
) -> anyhow::Result<Ingested> {
    let mut archive = tar::Archive::new(reader);
    let mut entries = Vec::new();
    let mut contents = HashMap::new();
    let mut filtered = 0;
    let mut spooled = 0u64;
    for item in archive
        .entries()
        .context("the archive is not a readable tar")?
    {
        let mut item = item.context("the archive is truncated or corrupt")?;
        let header = item.header();
        let raw_path = item.path_bytes().into_owned();
        let path = normalize_path(&utf8(&raw_path, "path")?)?;
        let mode = header.mode().context("bad mode")? & 0o7777;
        let uid = u32::try_from(header.uid().context("bad uid")?).context("uid too large")?;
        let gid = u32::try_from(header.gid().context("bad gid")?).context("gid too large")?;
        let kind = header.entry_type();
        if path != "/" && filter.excludes(&path) {
            filtered += 1;
            continue;
        }
        use tar::EntryType as T;
        let entry = match kind {
            T::Directory => Entry::directory(&path, mode, uid, gid),
            T::Regular | T::Continuous => {
                let target = spool.join(format!("{spooled:08}"));
                spooled += 1;
                let mut out = std::io::BufWriter::with_capacity(BUFFER, File::create(&target)?);
                let mut hasher = blake3::Hasher::new();
                let mut buf = vec![0u8; BUFFER];
                let mut size = 0u64;
                loop {
                    let n = item
                        .read(&mut buf)
                        .with_context(|| format!("{path}: the archive is truncated or corrupt"))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    out.write_all(&buf[..n])?;
                    size += n as u64;
                }
                out.flush()?;
                progress.inc(size);
                let hash = *hasher.finalize().as_bytes();
                contents.entry(hash).or_insert(target);
                Entry::file(&path, mode, uid, gid, size, hash)
            }
            T::Symlink => {
                let target = item
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                Entry::symlink(&path, uid, gid, &utf8(&target, "symlink target")?)
            }
            T::Link => {
                let target = item
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let target = normalize_path(&utf8(&target, "hard link target")?)
                    .with_context(|| format!("hard link {path} points outside the tree"))?;
                Entry::hard_link(&path, &target)
            }
            T::Char | T::Block | T::Fifo => {
                bail!("{path} is a device node or FIFO; images hold files, directories and links")
            }
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => continue,
            other => bail!("{path} has an unsupported entry type {other:?}"),
        };
        entries.push(entry);
    }
    // Read to the end of the compressed stream, so its checksum is verified even though tar
    // stopped at its end-of-archive marker.
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink())
        .context("the archive is truncated or corrupt")?;
    add_missing_parents(&mut entries);
    Ok(Ingested {
        manifest: Manifest::new(entries)?,
        contents,
        filtered,
    })
}

/// A directory is read by the agent's scanner in strict mode, so an image and a machine
/// scanned by its agent give the same entries, and the same root, for the same tree.
fn read_directory(
    root: &Path,
    filter: &Filter,
    progress: &ProgressBar,
) -> anyhow::Result<Ingested> {
    let config = ScanConfig {
        root: root.to_owned(),
        excluded: filter.clone(),
        bytes_per_sec: None,
        one_file_system: false,
        strict: true,
    };
    let report = |p: Progress| match p {
        Progress::Walked { bytes, .. } => progress.set_length(bytes),
        Progress::Read(n) => progress.inc(n),
    };
    let tree = scan_with_progress(&config, None, true, &report)?;
    let filtered = tree.excluded();
    let manifest = tree.into_manifest();
    let mut contents = HashMap::new();
    for entry in manifest.entries().iter().filter(|e| e.kind == Kind::File) {
        contents
            .entry(entry.hash)
            .or_insert_with(|| root.join(&entry.path[1..]));
    }
    Ok(Ingested {
        manifest,
        contents,
        filtered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_cksum();
            builder
                .append_data(&mut header, path, data.as_slice())
                .unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn read(name: &str, bytes: &[u8]) -> anyhow::Result<Ingested> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let spool = dir.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        read_source(&path, &Filter::empty(), &spool, &ProgressBar::hidden())
    }

    /// A tree with every kind of entry, hard links among them.
    fn make_tree(root: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::hard_link(root.join("etc/passwd"), root.join("etc/passwd-")).unwrap();
        std::fs::hard_link(root.join("etc/passwd"), root.join("etc/apasswd")).unwrap();
        std::fs::write(root.join("etc/ssh/sshd_config"), b"Port 22\n").unwrap();
        std::fs::set_permissions(
            root.join("etc/ssh/sshd_config"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::write(root.join("usr/bin/tool"), vec![3u8; 3 << 20]).unwrap();
        std::fs::write(root.join("usr/bin/same"), vec![3u8; 3 << 20]).unwrap();
        std::os::unix::fs::symlink("../../etc/passwd", root.join("usr/bin/pw")).unwrap();
    }

    #[test]
    fn a_directory_reads_as_its_tar_archive_does() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        make_tree(&tree);
        let from_dir = read_source(&tree, &Filter::empty(), dir.path(), &ProgressBar::hidden())
            .unwrap_or_else(|e| panic!("{e:#}"));
        // GNU tar keeps hard links, which the tar crate's builder does not.
        let archive = dir.path().join("tree.tar");
        let status = std::process::Command::new("tar")
            .args(["--numeric-owner", "-C"])
            .arg(&tree)
            .arg("-cf")
            .arg(&archive)
            .arg(".")
            .status();
        let Ok(status) = status else {
            eprintln!("no tar on PATH: comparison skipped");
            return;
        };
        assert!(status.success());
        let spool = dir.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        let from_tar = read_source(&archive, &Filter::empty(), &spool, &ProgressBar::hidden())
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(from_dir.manifest.entries(), from_tar.manifest.entries());
        assert_eq!(from_dir.manifest.root_hash(), from_tar.manifest.root_hash());
        // One path for each distinct content, inside the tree, holding that content.
        assert_eq!(from_dir.contents.len(), 3);
        for (hash, path) in &from_dir.contents {
            assert!(path.starts_with(&tree));
            assert_eq!(blake3::hash(&std::fs::read(path).unwrap()).as_bytes(), hash);
        }
    }

    #[test]
    fn a_directory_is_filtered_and_its_progress_reaches_the_total() {
        let dir = tempfile::tempdir().unwrap();
        make_tree(dir.path());
        let filter = Filter::new(vec!["/usr/bin/.*".into()]).unwrap();
        let bar = ProgressBar::hidden();
        let read = read_source(dir.path(), &filter, dir.path(), &bar).unwrap();
        assert_eq!(read.filtered, 3);
        assert!(read.manifest.get("/usr/bin").is_some());
        assert!(read.manifest.get("/usr/bin/tool").is_none());
        assert_eq!(bar.length(), Some(read.manifest.bytes()));
        assert_eq!(bar.position(), read.manifest.bytes());
    }

    #[test]
    fn a_fifo_in_a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        make_tree(dir.path());
        let fifo = std::ffi::CString::new(
            dir.path()
                .join("etc/fifo")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let error = read_source(
            dir.path(),
            &Filter::empty(),
            dir.path(),
            &ProgressBar::hidden(),
        )
        .err()
        .expect("a FIFO is refused");
        assert_eq!(
            format!("{error:#}"),
            "/etc/fifo is a device node, FIFO or socket; images hold files, directories and links"
        );
    }

    #[test]
    fn a_corrupt_gzip_body_is_refused() {
        let data: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let tar = tar_of(&[("etc/data", data)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).unwrap();
        let mut gz = gz.finish().unwrap();
        if let Err(e) = read("ok.tar.gz", &gz) {
            panic!("{e:#}");
        }
        let mid = gz.len() / 2;
        for byte in &mut gz[mid..mid + 10] {
            *byte ^= 0xff;
        }
        assert!(read("bad.tar.gz", &gz).is_err());
    }
}
