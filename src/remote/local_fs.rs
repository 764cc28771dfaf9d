//! The `file://` store: object_store's `LocalFileSystem` (with fsync), with
//! one check in front of every read: the object's path must be a regular
//! file. A FIFO put under an object's name (by hand, by a hostile user of
//! the store's directory) made `LocalFileSystem`'s `open` block forever on
//! a thread the runtime then waited for: `lookup --remote` and `verify`
//! hung, and a drain ran far past its deadline (helper-52, session 27). A
//! device or a socket is refused the same way; a directory keeps
//! `LocalFileSystem`'s own answer to a read (not found). A write to a key
//! where a directory stands is refused with a message naming it: the
//! store's `AlreadyExists` for it, then not found on the read that
//! followed, had made `reconcile --repair` loop with no word about the
//! directory (helper-78 F5).

use std::fmt;
use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// [`LocalFileSystem`] that refuses to open what is not a regular file.
#[derive(Debug)]
pub struct RegularFiles(pub LocalFileSystem);

impl fmt::Display for RegularFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl RegularFiles {
    /// `Err` when `location` names something that is neither a regular
    /// file nor a directory (symlinks followed); a missing path is left to
    /// the store (its `NotFound`).
    fn check(&self, location: &Path) -> Result<()> {
        let path = self.0.path_to_filesystem(location)?;
        let Ok(m) = std::fs::metadata(&path) else {
            return Ok(());
        };
        let t = m.file_type();
        if t.is_file() || t.is_dir() {
            return Ok(());
        }
        let kind = format!("a {}", crate::durable::file_kind(&t));
        Err(object_store::Error::Generic {
            store: "LocalFileSystem",
            source: format!(
                "{} is {kind}, not a regular file: not opened (it could block forever). Move \
                 it out of the store's directory",
                path.display()
            )
            .into(),
        })
    }

    /// `Err` when a directory stands where `location`'s object would be
    /// written: no write replaces it, and no retry changes that (the
    /// error's cause is an `IsADirectory` I/O error, which
    /// [`crate::remote::classify`] treats as permanent).
    fn check_target(&self, location: &Path) -> Result<()> {
        let path = self.0.path_to_filesystem(location)?;
        // Followed: a symlink to a directory stands in the way as much
        // (helper-85 F5).
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => Err(directory_in_the_way(&path)),
            _ => Ok(()),
        }
    }
}

/// The error for a directory where an object belongs.
pub(crate) fn directory_in_the_way(path: &std::path::Path) -> object_store::Error {
    object_store::Error::Generic {
        store: "LocalFileSystem",
        source: Box::new(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            format!(
                "{} is a directory where an object belongs (tierindex never makes one \
                 there): move it out of the store's directory, then run the command again",
                path.display()
            ),
        )),
    }
}

#[async_trait]
impl ObjectStore for RegularFiles {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.check_target(location)?;
        self.0.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.check_target(location)?;
        self.0.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.check(location)?;
        self.0.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.check(location)?;
        self.0.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.0.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.0.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.0.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.0.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.check(from)?;
        self.check_target(to)?;
        self.0.copy_opts(from, to, options).await
    }

    // The store's own (atomic) rename, not the trait's copy-then-delete.
    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.check_target(to)?;
        self.0.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt as _;

    #[tokio::test]
    async fn a_fifo_under_an_objects_name_is_refused_not_opened() {
        let d = tempfile::tempdir().unwrap();
        let s = RegularFiles(LocalFileSystem::new_with_prefix(d.path()).unwrap());
        s.put(&Path::from("a/good"), PutPayload::from_static(b"x"))
            .await
            .unwrap();
        std::fs::create_dir_all(d.path().join("a")).unwrap();
        let fifo = d.path().join("a/fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that lives across the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let t = std::time::Instant::now();
        let e = match s.get(&Path::from("a/fifo")).await {
            Ok(_) => panic!("a FIFO was opened"),
            Err(e) => e,
        };
        assert!(e.to_string().contains("a FIFO"), "{e}");
        assert!(s.head(&Path::from("a/fifo")).await.is_err());
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        let got = s.get(&Path::from("a/good")).await.unwrap().bytes().await;
        assert_eq!(got.unwrap().as_ref(), b"x");
        assert!(matches!(
            s.get(&Path::from("a/none")).await,
            Err(object_store::Error::NotFound { .. })
        ));
    }

    /// helper-78 F5: a directory where an object belongs made every create
    /// answer AlreadyExists and every read "not found", and a repair loop.
    /// A write names the directory, and no retry is spent on it.
    #[tokio::test]
    async fn a_write_over_a_directory_names_it_and_is_not_retried() {
        let d = tempfile::tempdir().unwrap();
        let s = RegularFiles(LocalFileSystem::new_with_prefix(d.path()).unwrap());
        std::fs::create_dir_all(d.path().join("a/obj")).unwrap();
        std::fs::write(d.path().join("a/obj/child"), b"hi").unwrap();
        let key = Path::from("a/obj");
        let create = PutOptions {
            mode: object_store::PutMode::Create,
            ..Default::default()
        };
        let e = s
            .put_opts(&key, PutPayload::from_static(b"x"), create)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("is a directory where an object"), "{e}");
        let e = crate::remote::classify(e);
        assert!(matches!(e, crate::Error::Remote(_)), "{e:?}");
        assert!(s.put_multipart_opts(&key, Default::default()).await.is_err());
        let mp = super::super::local_multipart::LocalMultipart::new(d.path().to_path_buf());
        use object_store::multipart::MultipartStore as _;
        let e = mp.create_multipart(&key).await.unwrap_err();
        assert!(e.to_string().contains("is a directory where an object"), "{e}");
        // Nothing under the directory was touched.
        assert_eq!(std::fs::read(d.path().join("a/obj/child")).unwrap(), b"hi");
        // A symlink to a directory (helper-85 F5).
        std::os::unix::fs::symlink(d.path().join("a/obj"), d.path().join("a/link")).unwrap();
        let create = PutOptions {
            mode: object_store::PutMode::Create,
            ..Default::default()
        };
        let e = s
            .put_opts(&Path::from("a/link"), PutPayload::from_static(b"x"), create)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("is a directory where an object"), "{e}");
    }
}
