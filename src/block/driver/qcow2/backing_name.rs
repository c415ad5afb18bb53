//! `change-backing-file` on a qcow2 image: the header is read again from
//! the file (the copy from open may be stale: the corrupt bit), its
//! backing file name and backing format extension replaced, and the whole
//! header cluster written back through the writer the command found for
//! the image's file (which also flushes).

use super::{HeaderWriter, Qcow2Driver};
use crate::block::qcow2::format::{ExtensionKind, FormatError, HeaderExtension};
use std::path::Path;
use std::sync::PoisonError;

impl Qcow2Driver {
    /// Records `name` and `format` as the image's backing file; an errno
    /// when that cannot be done (EINVAL for a name too long, ENOSPC when
    /// the header no longer fits its cluster).
    pub(super) fn rewrite_backing(
        &self,
        name: &str,
        format: &str,
        write: HeaderWriter<'_>,
    ) -> Result<(), i32> {
        let mut h = super::read_header(&self.io.file.node()).map_err(|e| {
            log::error!("qcow2 node '{}': reading the header: {e}", self.io.name);
            -libc::EIO
        })?;
        let ext = HeaderExtension::new(ExtensionKind::BackingFormat, format.as_bytes().to_vec());
        match h
            .extensions
            .iter_mut()
            .find(|e| e.kind == ExtensionKind::BackingFormat)
        {
            Some(e) => *e = ext,
            None => h.extensions.insert(0, ext),
        }
        h.set_backing_file(Some(name.as_bytes()))
            .map_err(|e| errno_of(&e))?;
        let mut buf = vec![0u8; h.cluster_size() as usize];
        h.encode(&mut buf).map_err(|e| errno_of(&e))?;
        write(&buf)?;
        let full = if Path::new(name).is_absolute() {
            name.to_string()
        } else {
            match Path::new(&self.file_filename).parent() {
                Some(dir) => dir.join(name).to_string_lossy().into_owned(),
                None => name.to_string(),
            }
        };
        *self.header.lock().unwrap_or_else(PoisonError::into_inner) = h;
        *self
            .backing_filename
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(full);
        Ok(())
    }
}

fn errno_of(e: &FormatError) -> i32 {
    match e {
        FormatError::BackingFileNameTooLong => -libc::EINVAL,
        FormatError::HeaderDoesNotFit { .. } => -libc::ENOSPC,
        _ => -libc::EINVAL,
    }
}
