//! Prints, for a range of `stock_scale` values, the share of TPC-H orders that all-or-nothing
//! reservation in list order fails for insufficient stock ([`orderflow::demo::tpch::simulate`]), for the SF 0.01
//! orders and for the first 1,000 of them: how `DEFAULT_STOCK_SCALE` and the demo's
//! `--stock-scale` were chosen, with no stock at HQ and with the default HQ share. 52 generations at SF 0.01 (seconds in release, far slower in a
//! debug build):
//!
//! ```text
//! cargo run --release -p orderflow --example tpch_calibrate
//! ```

use orderflow::demo::tpch::{generate, simulate, TpchOptions, DEFAULT_HQ_SHARE};

fn main() {
    for max_orders in [None, Some(1_000)] {
        for scale in [0.03, 0.05, 0.06, 0.065, 0.07, 0.075, 0.08, 0.09, 0.1, 0.11, 0.12, 0.15, 0.2] {
            let started = std::time::Instant::now();
            for hq_share in [0.0, DEFAULT_HQ_SHARE] {
                let input = generate(&TpchOptions { max_orders, stock_scale: scale, hq_share, ..TpchOptions::default() });
                let elapsed = started.elapsed();
                let sim = simulate(&input);
                println!(
                    "max_orders {max_orders:?} stock_scale {scale} hq_share {hq_share}: share {:.3} ({sim:?}) in {elapsed:?}",
                    sim.share()
                );
            }
        }
    }
}
