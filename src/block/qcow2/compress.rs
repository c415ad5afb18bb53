//! Decompressing compressed clusters: raw deflate (zlib's format without
//! its header, compression type 0) or zstd (type 1).
//!
//! The compressed data's length is known only to the sector, so input may
//! run on past the end of the stream; output must fill exactly one
//! cluster. As in QEMU, a deflate stream that would go on past the
//! cluster is cut at the cluster, while a zstd frame must end there.

use miniz_oxide::inflate::core::{decompress as inflate, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;
use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};

use super::error::FormatError;
use super::header::CompressionType;

/// Largest zstd window accepted: 8 MiB, four times the largest cluster.
/// A frame that asks for more would make the decoder allocate it; QEMU's
/// frames are one cluster with the content size set, whose window is at
/// most the cluster.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Decompresses `input` (the bytes a [`CompressedCluster`] descriptor
/// covers) into `cluster`, which must be one cluster long and is filled
/// completely on success.
///
/// [`CompressedCluster`]: super::entries::CompressedCluster
pub fn decompress(
    kind: CompressionType,
    input: &[u8],
    cluster: &mut [u8],
) -> Result<(), FormatError> {
    match kind {
        CompressionType::Zlib => inflate_raw(input, cluster),
        CompressionType::Zstd => unzstd(input, cluster),
    }
}

fn inflate_raw(input: &[u8], cluster: &mut [u8]) -> Result<(), FormatError> {
    let mut state = Box::<DecompressorOxide>::default();
    // Raw deflate, all input present, output the whole buffer.
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _, written) = inflate(&mut state, input, cluster, 0, flags);
    match status {
        // A full cluster is what is wanted, whether or not the stream
        // says it has more.
        TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == cluster.len() => Ok(()),
        TINFLStatus::Done | TINFLStatus::FailedCannotMakeProgress | TINFLStatus::NeedsMoreInput => {
            Err(FormatError::DecompressedShort {
                got: written,
                expected: cluster.len(),
            })
        }
        other => Err(FormatError::CompressedCorrupt(format!(
            "deflate stream: {other:?}"
        ))),
    }
}

fn unzstd(input: &[u8], cluster: &mut [u8]) -> Result<(), FormatError> {
    let corrupt = |e: std::io::Error| FormatError::CompressedCorrupt(format!("zstd frame: {e}"));
    let mut decoder = Decoder::new().map_err(corrupt)?;
    decoder
        .set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
        .map_err(corrupt)?;
    let expected = cluster.len();
    let mut input = InBuffer::around(input);
    let mut output = OutBuffer::around(cluster);
    // Non-zero while the frame has more to give.
    let mut pending = 1;
    while output.pos() < expected {
        let before = (input.pos(), output.pos());
        pending = decoder.run(&mut input, &mut output).map_err(corrupt)?;
        if (input.pos(), output.pos()) == before {
            return Err(FormatError::DecompressedShort {
                got: output.pos(),
                expected,
            });
        }
    }
    if pending != 0 {
        return Err(FormatError::DecompressedLong(expected));
    }
    Ok(())
}
