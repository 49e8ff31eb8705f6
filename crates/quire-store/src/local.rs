//! Results kept as files below a folder: [`LocalStore`].
//! Imports: the crate root ([`BlobStore`], [`StoreError`]) only.

use crate::{BlobStore, StoreError};
use async_trait::async_trait;
use std::path::{Path, PathBuf};

pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalStore { root: root.into() }
    }

    /// Keys are built by `quire_core::keys` and are already safe; this is a
    /// second guard so that no key can name a path outside the root.
    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        let mut p = self.root.clone();
        for part in key.split('/') {
            match part {
                "" | "." => {}
                ".." => return Err(StoreError::Permanent(format!("refusing key with '..': {key}"))),
                _ => p.push(part),
            }
        }
        Ok(p)
    }
}

/// Output files get the usual `0666 & !umask` (0644 with the common umask 022), as any other
/// program's files would: a temporary file alone would be 0600, readable by nobody else.
fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().expect("keys have a parent");
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".quire-tmp-")
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file().sync_data()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[async_trait]
impl BlobStore for LocalStore {
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        let path = self.path(key)?;
        tokio::task::spawn_blocking(move || write_atomic(&path, &data))
            .await
            .map_err(|e| StoreError::Transient(e.to_string()))??;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match tokio::fs::read(self.path(key)?).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        Ok(tokio::fs::try_exists(self.path(key)?).await?)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        // Walk only the folder the prefix names, then filter by the rest.
        let dir_part = prefix.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap_or_default();
        let start = self.path(&dir_part)?;
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            if !start.exists() {
                return Ok(out);
            }
            for entry in walkdir::WalkDir::new(&start) {
                let entry = entry.map_err(|e| StoreError::Transient(e.to_string()))?;
                if !entry.file_type().is_file() {
                    continue;
                }
                let name = entry.file_name().to_string_lossy();
                if name.starts_with(".quire-tmp-") {
                    continue;
                }
                let rel = entry.path().strip_prefix(&root).expect("below root");
                let key = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
                if key.starts_with(&prefix) {
                    out.push(key);
                }
            }
            out.sort();
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Transient(e.to_string()))?
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match tokio::fs::remove_file(self.path(key)?).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// A file system rename: the file is at one of the two places at any time.
    async fn rename(&self, from: &str, to: &str) -> Result<(), StoreError> {
        let (from, to) = (self.path(from)?, self.path(to)?);
        tokio::task::spawn_blocking(move || {
            if !from.exists() {
                return Ok(());
            }
            std::fs::create_dir_all(to.parent().expect("keys have a parent"))?;
            std::fs::rename(&from, &to)
        })
        .await
        .map_err(|e| StoreError::Transient(e.to_string()))??;
        Ok(())
    }

    fn locate(&self, key: &str) -> String {
        self.path(key).map(|p| p.display().to_string()).unwrap_or_else(|_| key.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn umask() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:")).expect("Umask in /proc/self/status");
        u32::from_str_radix(line.trim(), 8).unwrap()
    }

    #[tokio::test]
    async fn written_files_follow_the_umask_like_other_programs_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path());
        s.put("job/results/a.jsonl", b"one".to_vec()).await.unwrap();
        let mode = std::fs::metadata(dir.path().join("job/results/a.jsonl")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask(), "a result file must be readable as the umask allows, not 0600");
    }

    #[tokio::test]
    async fn put_get_list_and_refuse_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path());
        s.put("job/results/a.jsonl", b"one".to_vec()).await.unwrap();
        s.put("job/results/a.jsonl", b"two".to_vec()).await.unwrap();
        s.put("job/markdown/sub dir/é.pdf.md", b"md".to_vec()).await.unwrap();
        assert_eq!(s.get("job/results/a.jsonl").await.unwrap().unwrap(), b"two");
        assert!(s.get("job/results/b.jsonl").await.unwrap().is_none());
        assert!(s.exists("job/results/a.jsonl").await.unwrap());
        assert_eq!(s.list("job/results/").await.unwrap(), vec!["job/results/a.jsonl"]);
        assert_eq!(s.list("job/").await.unwrap().len(), 2);
        assert!(s.put("../escape", b"x".to_vec()).await.is_err());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("job/results")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp files left behind");
    }
}
