//! F32, F16 and BF16 storage: one element per "block", little-endian.
//!
//! The conversions are exact widenings, the same as the gguf Python package: F16 through the IEEE
//! half-to-single conversion, BF16 by placing its 16 bits on top of an f32.

/// Copies little-endian f32 values.
pub fn dequantize_row_f32(src: &[u8], dst: &mut [f32]) {
    for (out, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *out = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// Widens little-endian IEEE half-precision values to f32.
pub fn dequantize_row_f16(src: &[u8], dst: &mut [f32]) {
    for (out, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *out = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    }
}

/// Widens little-endian bfloat16 values to f32 (the upper 16 bits of an f32).
pub fn dequantize_row_bf16(src: &[u8], dst: &mut [f32]) {
    for (out, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *out = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip() {
        let vals = [0.0f32, -0.0, 1.5, -3.25e-20, f32::MAX, f32::MIN_POSITIVE, f32::INFINITY];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = vec![0.0; vals.len()];
        dequantize_row_f32(&bytes, &mut out);
        for (a, b) in vals.iter().zip(&out) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }

    #[test]
    fn f16_known_values() {
        // 1.0, -2.0, 65504 (max), smallest subnormal, 0.5
        let bits: [u16; 5] = [0x3c00, 0xc000, 0x7bff, 0x0001, 0x3800];
        let want = [1.0f32, -2.0, 65504.0, 2f32.powi(-24), 0.5];
        let bytes: Vec<u8> = bits.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = vec![0.0; bits.len()];
        dequantize_row_f16(&bytes, &mut out);
        assert_eq!(out, want);
    }

    #[test]
    fn bf16_is_upper_half() {
        let vals = [1.0f32, -7.5, 3.0e38, 1.0e-38];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect();
        let mut out = vec![0.0; vals.len()];
        dequantize_row_bf16(&bytes, &mut out);
        for (a, b) in vals.iter().zip(&out) {
            assert_eq!(a.to_bits() & 0xffff_0000, b.to_bits());
        }
    }
}
