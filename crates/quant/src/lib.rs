//! Block formats of GGML tensors: exact scalar dequantization per type (one file per block family),
//! and the matrix products the model runs on them.
//!
//! Every `dequantize_row` here is the reference: f16 scales widened to f32 and multiplied by small
//! integers in f32, in the same order of operations as the format's definition, so the results are
//! bit-identical to the gguf Python package (checked against `shared/fixtures/dequant`).

#[macro_use]
mod byte_dot;

pub mod act_q8;
pub mod act_q8k;
pub mod aligned;
pub mod dot_float;
pub mod dot_i16;
pub mod dot_kquant;
pub mod dot_legacy;
pub mod exp;
pub mod float;
pub mod gemm;
pub mod interleave;
pub mod iq4_nl;
pub mod iq4_xs;
pub mod isa;
pub mod matmul;
pub mod q2_k;
pub mod q3_k;
pub mod q4_0;
pub mod q4_1;
pub mod q4_k;
pub mod q5_0;
pub mod q5_1;
pub mod q5_k;
pub mod q6_k;
pub mod q8_0;

use kiln_gguf::GgmlType;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    #[error("tensor type {0} is not supported by kiln (supported: F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_NL IQ4_XS)")]
    Unsupported(GgmlType),
    #[error("{ty}: {n_elements} elements is not a whole number of {block}-element blocks")]
    NotBlockMultiple { ty: GgmlType, n_elements: usize, block: usize },
    #[error("{ty}: {n_elements} elements need {expected} bytes, got {got}")]
    WrongByteCount { ty: GgmlType, n_elements: usize, expected: usize, got: usize },
}

/// Dequantizes `dst.len()` consecutive elements stored as `ty` in `src` into `dst`.
///
/// `src` must hold exactly the bytes of those elements (`ty.bytes_for(dst.len())`).
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    let block = ty.block_size();
    if !dst.len().is_multiple_of(block) {
        return Err(QuantError::NotBlockMultiple { ty, n_elements: dst.len(), block });
    }
    let expected = dst.len() / block * ty.type_size();
    if src.len() != expected {
        return Err(QuantError::WrongByteCount { ty, n_elements: dst.len(), expected, got: src.len() });
    }
    match ty {
        GgmlType::F32 => float::dequantize_row_f32(src, dst),
        GgmlType::F16 => float::dequantize_row_f16(src, dst),
        GgmlType::BF16 => float::dequantize_row_bf16(src, dst),
        GgmlType::Q4_0 => q4_0::dequantize_row(src, dst),
        GgmlType::Q4_1 => q4_1::dequantize_row(src, dst),
        GgmlType::Q5_0 => q5_0::dequantize_row(src, dst),
        GgmlType::Q5_1 => q5_1::dequantize_row(src, dst),
        GgmlType::Q8_0 => q8_0::dequantize_row(src, dst),
        GgmlType::Q2_K => q2_k::dequantize_row(src, dst),
        GgmlType::Q3_K => q3_k::dequantize_row(src, dst),
        GgmlType::Q4_K => q4_k::dequantize_row(src, dst),
        GgmlType::Q5_K => q5_k::dequantize_row(src, dst),
        GgmlType::Q6_K => q6_k::dequantize_row(src, dst),
        GgmlType::IQ4_NL => iq4_nl::dequantize_row(src, dst),
        GgmlType::IQ4_XS => iq4_xs::dequantize_row(src, dst),
        other => return Err(QuantError::Unsupported(other)),
    }
    Ok(())
}
