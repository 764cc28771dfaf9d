//! Multipart uploads for the `file://` store.
//!
//! `object_store`'s `LocalFileSystem` has no `MultipartStore`, so without
//! this the embedded default store would never take the multipart path
//! that S3 takes for large segments (and the crash harness could not crash
//! inside it). The semantics follow S3's:
//!
//! * `create_multipart` makes `ROOT/.tierindex-multipart/ID/` (random ID)
//!   holding the target key; nothing is visible under the key.
//! * `put_part` writes part `IDX` as a file there (tmp, fsync, rename): a
//!   part either exists whole or not at all, like an acknowledged S3 part.
//! * `complete_multipart` concatenates the parts in order into a temporary
//!   file next to the object, fsyncs it, renames it over the key and fsyncs
//!   the directory (unconditional, as S3's CompleteMultipartUpload), then
//!   removes the upload directory. An unknown upload is `NotFound`.
//! * `abort_multipart` removes the upload directory (`NotFound` if absent).
//! * [`LocalMultipart::list_uploads`] lists the upload directories, like
//!   S3's ListMultipartUploads: key, id, and the time the upload was
//!   initiated (the mtime of its `key` file, written once by
//!   `create_multipart`). A directory without a readable `key` (a crash
//!   inside `create_multipart`) names no key and is not listed.

use std::io::Write;
use std::path::{Path as FsPath, PathBuf};

use async_trait::async_trait;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{MultipartId, PutMultipartOptions, PutPayload, PutResult};

use super::PendingUpload;

/// Directory under the store root holding uploads in progress.
pub const UPLOADS_DIR: &str = ".tierindex-multipart";

/// File-backed multipart uploads under a `file://` store root.
#[derive(Debug)]
pub struct LocalMultipart {
    root: PathBuf,
}

impl LocalMultipart {
    pub fn new(root: PathBuf) -> LocalMultipart {
        LocalMultipart { root }
    }

    fn upload_dir(&self, id: &str) -> object_store::Result<PathBuf> {
        // The id comes back from callers (and from the journal): only accept
        // what create_multipart hands out.
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(object_store::Error::NotFound {
                path: id.to_string(),
                source: "not a multipart upload id of this store".into(),
            });
        }
        Ok(self.root.join(UPLOADS_DIR).join(id))
    }

    fn object_path(&self, key: &Path) -> PathBuf {
        let mut p = self.root.clone();
        for part in key.parts() {
            p.push(part.as_ref());
        }
        p
    }
}

/// Longest `key` file read back (S3 keys are at most 1024 bytes).
const MAX_KEY_FILE: u64 = 4096;

impl LocalMultipart {
    /// Every upload in progress (any key), in id order.
    pub async fn list_uploads(&self) -> object_store::Result<Vec<PendingUpload>> {
        let dir = self.root.join(UPLOADS_DIR);
        blocking(move || {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(io_err(&dir, e)),
            };
            let mut out = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| io_err(&dir, e))?;
                let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    continue;
                }
                let key_file = entry.path().join("key");
                let meta = match std::fs::metadata(&key_file) {
                    Ok(m) if m.is_file() && m.len() <= MAX_KEY_FILE => m,
                    Ok(_) => continue,
                    // Gone since read_dir (completed, aborted) or never written.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err(&key_file, e)),
                };
                let key = match std::fs::read(&key_file) {
                    Ok(b) => match String::from_utf8(b) {
                        Ok(k) => k,
                        Err(_) => continue,
                    },
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err(&key_file, e)),
                };
                let initiated_ms = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .and_then(|d| u64::try_from(d.as_millis()).ok());
                out.push(PendingUpload {
                    key,
                    upload_id: id,
                    initiated_ms,
                });
            }
            out.sort_by(|a, b| a.upload_id.cmp(&b.upload_id));
            Ok(out)
        })
        .await
    }
}

/// A directory where the object belongs: no rename replaces it (see
/// [`super::local_fs::directory_in_the_way`]).
fn refuse_directory(dst: &FsPath) -> object_store::Result<()> {
    match std::fs::metadata(dst) {
        Ok(m) if m.is_dir() => Err(super::local_fs::directory_in_the_way(dst)),
        _ => Ok(()),
    }
}

fn io_err(path: &FsPath, e: std::io::Error) -> object_store::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        object_store::Error::NotFound {
            path: path.display().to_string(),
            source: Box::new(e),
        }
    } else {
        object_store::Error::Generic {
            store: "LocalMultipart",
            source: format!("{}: {e}", path.display()).into(),
        }
    }
}

fn sync_dir(dir: &FsPath) -> object_store::Result<()> {
    crate::durable::fsync_dir(dir).map_err(|e| object_store::Error::Generic {
        store: "LocalMultipart",
        source: e.to_string().into(),
    })
}

/// Write `chunks` to `dst` durably: `tmp` (same file system), fsync,
/// rename, directory fsync.
fn write_durably(tmp: &FsPath, dst: &FsPath, chunks: &[&[u8]]) -> object_store::Result<()> {
    let dir = dst
        .parent()
        .ok_or_else(|| io_err(dst, std::io::ErrorKind::InvalidInput.into()))?;
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let res = (|| {
        let mut f = std::fs::File::create(tmp)?;
        for c in chunks {
            f.write_all(c)?;
        }
        f.sync_all()?;
        std::fs::rename(tmp, dst)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(tmp);
        return Err(io_err(dst, e));
    }
    sync_dir(dir)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> object_store::Result<T> + Send + 'static,
) -> object_store::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| object_store::Error::Generic {
            store: "LocalMultipart",
            source: Box::new(e),
        })?
}

#[async_trait]
impl MultipartStore for LocalMultipart {
    async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
        let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let dir = self.upload_dir(&id)?;
        let key = path.to_string();
        let dst = self.object_path(path);
        blocking(move || {
            refuse_directory(&dst)?;
            std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
            write_durably(&dir.join("key.tmp"), &dir.join("key"), &[key.as_bytes()])?;
            Ok(id)
        })
        .await
    }

    async fn create_multipart_opts(
        &self,
        path: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<MultipartId> {
        // Like LocalFileSystem's puts: no object metadata.
        if !opts.attributes.is_empty() || !opts.tags.is_empty() {
            return Err(object_store::Error::NotImplemented {
                operation: "multipart upload with attributes on the file store".into(),
                implementer: "LocalMultipart".into(),
            });
        }
        self.create_multipart(path).await
    }

    async fn put_part(
        &self,
        _path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        let dir = self.upload_dir(id)?;
        blocking(move || {
            if !dir.is_dir() {
                return Err(io_err(&dir, std::io::ErrorKind::NotFound.into()));
            }
            let chunks: Vec<&[u8]> = data.iter().map(|b| b.as_ref()).collect();
            let name = format!("{part_idx:06}");
            write_durably(&dir.join(format!("{name}.tmp")), &dir.join(name), &chunks)?;
            Ok(PartId {
                content_id: part_idx.to_string(),
            })
        })
        .await
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        let dir = self.upload_dir(id)?;
        let dst = self.object_path(path);
        blocking(move || {
            if !dir.is_dir() {
                return Err(io_err(&dir, std::io::ErrorKind::NotFound.into()));
            }
            let mut bodies = Vec::with_capacity(parts.len());
            for (i, p) in parts.iter().enumerate() {
                if p.content_id != i.to_string() {
                    return Err(object_store::Error::Generic {
                        store: "LocalMultipart",
                        source: format!("part {i} has id {:?}", p.content_id).into(),
                    });
                }
                let f = dir.join(format!("{i:06}"));
                bodies.push(std::fs::read(&f).map_err(|e| io_err(&f, e))?);
            }
            refuse_directory(&dst)?;
            let chunks: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
            // The object appears whole or not at all; its tmp stays inside
            // the upload directory, never next to other objects.
            write_durably(&dir.join("object.tmp"), &dst, &chunks)?;
            std::fs::remove_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
            if let Some(up) = dir.parent() {
                sync_dir(up)?;
            }
            let len: usize = bodies.iter().map(Vec::len).sum();
            Ok(PutResult {
                e_tag: Some(format!("mp-{len:x}")),
                version: None,
                extensions: Default::default(),
            })
        })
        .await
    }

    async fn abort_multipart(&self, _path: &Path, id: &MultipartId) -> object_store::Result<()> {
        let dir = self.upload_dir(id)?;
        blocking(move || {
            std::fs::remove_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
            if let Some(up) = dir.parent() {
                sync_dir(up)?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parts_complete_into_the_object_and_abort_removes_them() {
        let tmp = tempfile::tempdir().unwrap();
        let mp = LocalMultipart::new(tmp.path().to_path_buf());
        let key = Path::from("a/b/obj.seg");
        let id = mp.create_multipart(&key).await.unwrap();
        let p1 = mp
            .put_part(&key, &id, 1, PutPayload::from("world"))
            .await
            .unwrap();
        let p0 = mp
            .put_part(&key, &id, 0, PutPayload::from("hello "))
            .await
            .unwrap();
        assert!(
            !tmp.path().join("a/b/obj.seg").exists(),
            "invisible before complete"
        );
        mp.complete_multipart(&key, &id, vec![p0, p1])
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(tmp.path().join("a/b/obj.seg")).unwrap(),
            b"hello world"
        );
        assert!(matches!(
            mp.complete_multipart(&key, &id, vec![]).await,
            Err(object_store::Error::NotFound { .. })
        ));

        let id2 = mp.create_multipart(&key).await.unwrap();
        mp.put_part(&key, &id2, 0, PutPayload::from("x"))
            .await
            .unwrap();
        mp.abort_multipart(&key, &id2).await.unwrap();
        assert!(matches!(
            mp.abort_multipart(&key, &id2).await,
            Err(object_store::Error::NotFound { .. })
        ));
        assert!(matches!(
            mp.put_part(&key, &"../../etc".to_string(), 0, PutPayload::from("x"))
                .await,
            Err(object_store::Error::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn lists_uploads_in_progress_until_completed_or_aborted() {
        let tmp = tempfile::tempdir().unwrap();
        let mp = LocalMultipart::new(tmp.path().to_path_buf());
        assert_eq!(mp.list_uploads().await.unwrap(), vec![]);
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let (a, b) = (Path::from("s/segments/a.seg"), Path::from("other/b"));
        let ida = mp.create_multipart(&a).await.unwrap();
        let idb = mp.create_multipart(&b).await.unwrap();
        mp.put_part(&a, &ida, 0, PutPayload::from("x"))
            .await
            .unwrap();
        // Not uploads: a stray file, a non-hex directory, a directory whose
        // key was never written.
        let up = tmp.path().join(UPLOADS_DIR);
        std::fs::write(up.join("README"), b"x").unwrap();
        std::fs::create_dir(up.join("not-an-id")).unwrap();
        std::fs::create_dir(up.join("abcdef")).unwrap();
        let mut got = mp.list_uploads().await.unwrap();
        got.sort_by(|x, y| x.key.cmp(&y.key));
        let keys: Vec<(&str, &str)> = got
            .iter()
            .map(|u| (u.key.as_str(), u.upload_id.as_str()))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("other/b", idb.as_str()),
                ("s/segments/a.seg", ida.as_str())
            ]
        );
        for u in &got {
            let t = u.initiated_ms.expect("initiated time");
            assert!(t + 5_000 >= before, "{u:?} vs {before}");
        }
        mp.complete_multipart(
            &a,
            &ida,
            vec![PartId {
                content_id: "0".into(),
            }],
        )
        .await
        .unwrap();
        mp.abort_multipart(&b, &idb).await.unwrap();
        assert_eq!(mp.list_uploads().await.unwrap(), vec![]);
    }
}
