//! Matrix products through Q4_0 panels ([`kiln_quant::panel_q4_0`]) inside `matmul`: the rows held
//! in panels give the scalar oracle's bits (the panel kernel is bit-identical to it), the rows
//! left over give what the matrix without panels gives, and the prompt path (which unpacks the
//! panels back into the file's rows) is bit-identical to the matrix without panels.

use kiln_gguf::GgmlType;
use kiln_quant::act_q8::ActQ8;
use kiln_quant::dot_legacy::{vec_dot_q8_planes_unopt, vec_dot_q8_unopt};
use kiln_quant::matmul::{matmul, QMatrix};
use kiln_quant::panel_q4_0::repack;
mod common;

use common::{legacy_row, legacy_x};
use rand::rngs::StdRng;
use rand::SeedableRng;

#[test]
fn panels_match_oracle_and_leftover_rows_match_plain_matrix() {
    let mut rng = StdRng::seed_from_u64(7);
    let (rows, cols) = (21, 32 * 9); // two panels and five rows outside them
    let data: Vec<u8> = (0..rows).flat_map(|_| legacy_row(&mut rng, GgmlType::Q4_0, cols)).collect();
    let panels = repack(&data, rows, cols);
    for planes in [1, 2] {
        let plain = QMatrix::new(GgmlType::Q4_0, &data, rows, cols).unwrap().with_act_planes(planes);
        let packed = plain.with_panels(&panels).unwrap();
        assert_eq!(packed.panel_rows(), 16);
        for n in [1, 2, 3, 5, 20] {
            let x = legacy_x(&mut rng, n * cols);
            let mut want = vec![0f32; n * rows];
            let mut got = vec![0f32; n * rows];
            matmul(&plain, &x, n, &mut want);
            matmul(&packed, &x, n, &mut got);
            for t in 0..n {
                let xt = &x[t * cols..(t + 1) * cols];
                let mut a = ActQ8::new();
                a.quantize(xt);
                let mut r2 = ActQ8::new();
                r2.quantize_residual(&a, xt);
                for r in 0..rows {
                    let (g, w) = (got[t * rows + r], want[t * rows + r]);
                    if n >= 16 || r >= 16 {
                        assert_eq!(g.to_bits(), w.to_bits(), "planes {planes} n {n} token {t} row {r}");
                    } else {
                        let row = plain.row(r);
                        let oracle = if planes == 2 {
                            vec_dot_q8_planes_unopt(GgmlType::Q4_0, row, &a, &r2)
                        } else {
                            vec_dot_q8_unopt(GgmlType::Q4_0, row, &a)
                        };
                        assert_eq!(g.to_bits(), oracle.to_bits(), "planes {planes} n {n} token {t} row {r}");
                    }
                }
            }
        }
    }
}

#[test]
fn panels_of_the_wrong_length_are_refused() {
    let mut rng = StdRng::seed_from_u64(8);
    let data: Vec<u8> = (0..16).flat_map(|_| legacy_row(&mut rng, GgmlType::Q4_0, 64)).collect();
    let m = QMatrix::new(GgmlType::Q4_0, &data, 16, 64).unwrap();
    assert!(m.with_panels(&data[..data.len() - 18]).is_err());
    let q8 = vec![0u8; 16 * 2 * 34];
    let m8 = QMatrix::new(GgmlType::Q8_0, &q8, 16, 64).unwrap();
    assert!(m8.with_panels(&q8[..16 * 2 * 18]).is_err());
}
