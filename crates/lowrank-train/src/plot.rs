//! The loss curve picture, `loss.svg` (plotters' SVG backend: no fonts or image libraries).

use std::path::Path;

use lowrank_core::{Error, Result};
use plotters::prelude::*;

/// Draws training loss per step and, when present, eval loss points; written atomically.
pub fn loss_svg(path: &Path, train: &[(usize, f64)], eval: &[(usize, f64)]) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| Error::Msg(format!("loss.svg: {e}"));
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let all = train.iter().chain(eval).filter(|(_, l)| l.is_finite());
        let max_step = all.clone().map(|(s, _)| *s).max().unwrap_or(1).max(1);
        let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (_, l)| {
            (lo.min(*l), hi.max(*l))
        });
        let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(&root)
            .caption("loss", ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(0usize..max_step, (lo - pad)..(hi + pad))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("mean token loss")
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(
                train.iter().copied().filter(|(_, l)| l.is_finite()),
                &BLUE,
            ))
            .map_err(|e| err(&e))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        if !eval.is_empty() {
            chart
                .draw_series(LineSeries::new(eval.iter().copied(), &RED))
                .map_err(|e| err(&e))?
                .label("eval")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
            chart
                .draw_series(
                    eval.iter()
                        .map(|&(s, l)| Circle::new((s, l), 3, RED.filled())),
                )
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    lowrank_core::files::write_atomic(path, svg.as_bytes())
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_an_svg_with_both_curves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        let train: Vec<(usize, f64)> = (1..=20).map(|s| (s, 5.0 / s as f64)).collect();
        super::loss_svg(&path, &train, &[(0, 5.5), (20, 0.4)]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("<svg") && text.contains("polyline") && text.contains("eval"),
            "{}",
            &text[..200]
        );
    }
}
