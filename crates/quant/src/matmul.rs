//! Matrix products of a stored (possibly quantized) weight matrix with f32 activations.
//!
//! Two paths with the same inputs: `matmul_exact` (weights dequantized exactly, products summed in
//! f64 — the reference) and `matmul` (the default path: f32 accumulation in SIMD-friendly lanes).

use kiln_gguf::GgmlType;
use rayon::prelude::*;

use crate::{dequantize_row, QuantError};

/// A row-major weight matrix in its stored encoding: `rows` rows of `cols` elements each.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    row_bytes: usize,
}

impl<'a> QMatrix<'a> {
    pub fn new(ty: GgmlType, data: &'a [u8], rows: usize, cols: usize) -> Result<Self, QuantError> {
        if !ty.is_supported() {
            return Err(QuantError::Unsupported(ty));
        }
        if cols % ty.block_size() != 0 {
            return Err(QuantError::NotBlockMultiple {
                ty,
                n_elements: cols,
                block: ty.block_size(),
            });
        }
        let row_bytes = cols / ty.block_size() * ty.type_size();
        if data.len() != row_bytes * rows {
            return Err(QuantError::WrongByteCount {
                ty,
                n_elements: rows * cols,
                expected: row_bytes * rows,
                got: data.len(),
            });
        }
        Ok(QMatrix {
            ty,
            data,
            rows,
            cols,
            row_bytes,
        })
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Dequantizes row `r` into `out` (`cols` long). Infallible: the geometry was checked in `new`.
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        dequantize_row(self.ty, self.row(r), out).expect("geometry validated in QMatrix::new");
    }
}

/// Rows handled per parallel task: enough work to amortise scheduling, small enough to balance.
fn rows_per_task(rows: usize, n: usize) -> usize {
    let per = (4096 / n.max(1)).clamp(4, 64);
    per.min(rows.max(1))
}

/// `out[t * rows + r] = Σ_c w[r, c] · x[t * cols + c]` for `n` activation vectors `x`.
/// Weights are dequantized exactly to f32 and the products summed in f64.
pub fn matmul_exact(w: &QMatrix, x: &[f32], n: usize, out: &mut [f32]) {
    run_rows(w, x, n, out, |row, xs, res| {
        for (t, xt) in xs.chunks_exact(row.len()).enumerate() {
            res[t] = dot_f64(row, xt) as f32;
        }
    });
}

/// The default path: same result layout as [`matmul_exact`], f32 accumulation.
pub fn matmul(w: &QMatrix, x: &[f32], n: usize, out: &mut [f32]) {
    run_rows(w, x, n, out, |row, xs, res| {
        for (t, xt) in xs.chunks_exact(row.len()).enumerate() {
            res[t] = dot_f32(row, xt);
        }
    });
}

fn run_rows(
    w: &QMatrix,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    kernel: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) {
    assert_eq!(x.len(), n * w.cols, "activation length");
    assert_eq!(out.len(), n * w.rows, "output length");
    let per = rows_per_task(w.rows, n);
    let n_tasks = w.rows.div_ceil(per);
    // Each task produces its rows' results for every token ([rows_in_task][n]); scattered after.
    let results: Vec<Vec<f32>> = (0..n_tasks)
        .into_par_iter()
        .map(|task| {
            let r0 = task * per;
            let r1 = (r0 + per).min(w.rows);
            let mut row = vec![0f32; w.cols];
            let mut res = vec![0f32; (r1 - r0) * n];
            for r in r0..r1 {
                w.dequantize_row_into(r, &mut row);
                kernel(&row, x, &mut res[(r - r0) * n..(r - r0 + 1) * n]);
            }
            res
        })
        .collect();
    for (task, res) in results.iter().enumerate() {
        let r0 = task * per;
        for (i, chunk) in res.chunks_exact(n).enumerate() {
            for (t, &v) in chunk.iter().enumerate() {
                out[t * w.rows + r0 + i] = v;
            }
        }
    }
}

/// Dot product summed in f64 (exact for practical purposes: every f32 product is exact in f64).
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let mut ca = a.chunks_exact(4);
    let mut cb = b.chunks_exact(4);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..4 {
            acc[i] += x[i] as f64 * y[i] as f64;
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += *x as f64 * *y as f64;
    }
    s
}

/// Dot product in f32 with 16 independent lanes, which the compiler maps onto SIMD registers.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let mut ca = a.chunks_exact(L);
    let mut cb = b.chunks_exact(L);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    // Pairwise reduction keeps the rounding error of the final sum small.
    let mut w = L;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0] + s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_matrix_products_match_naive() {
        let (rows, cols, n) = (7, 48, 3);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let x: Vec<f32> = (0..n * cols).map(|i| ((i * 53 % 89) as f32 - 44.0) / 30.0).collect();
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let m = QMatrix::new(GgmlType::F32, &bytes, rows, cols).unwrap();
        let mut exact = vec![0f32; n * rows];
        let mut fast = vec![0f32; n * rows];
        matmul_exact(&m, &x, n, &mut exact);
        matmul(&m, &x, n, &mut fast);
        for t in 0..n {
            for r in 0..rows {
                let want: f64 = (0..cols).map(|c| w[r * cols + c] as f64 * x[t * cols + c] as f64).sum();
                assert_eq!(exact[t * rows + r], want as f32);
                assert!((fast[t * rows + r] as f64 - want).abs() <= 1e-5 * want.abs().max(1.0));
            }
        }
    }

    #[test]
    fn rejects_unsupported_and_bad_geometry() {
        assert_eq!(
            QMatrix::new(GgmlType::IQ2_XXS, &[], 0, 256).unwrap_err(),
            QuantError::Unsupported(GgmlType::IQ2_XXS)
        );
        assert!(QMatrix::new(GgmlType::Q4_0, &[0; 18], 1, 31).is_err());
        assert!(QMatrix::new(GgmlType::Q4_0, &[0; 17], 1, 32).is_err());
    }
}
