//! The pictures of an analysis, as SVG (plotters' SVG backend: no fonts or image libraries):
//! `spectrum.svg`, every module's singular values on a log scale (one colour per projection),
//! and `similarity.svg`, φ(i, j) heat maps averaged over the compared modules.

use std::path::Path;

use plotters::prelude::*;

use crate::analyze::report::{Comparison, ModuleSpectrum};
use crate::analyze::similarity::mean_grid;
use crate::{Error, Result};

/// Pixels kept right of the spectrum for its legend.
const LEGEND_WIDTH: u32 = 120;

/// Singular values below this share of the largest are round-off, not direction: not drawn.
const DRAW_FLOOR: f64 = 1e-10;

fn plot_error(what: &str) -> impl Fn(&dyn std::fmt::Display) -> Error + '_ {
    move |e| Error::Invalid(format!("drawing {what}: {e}"))
}

/// Writes an SVG string atomically.
pub fn write_svg(path: &Path, svg: &str) -> Result<()> {
    Ok(lowrank_core::files::write_atomic(path, svg.as_bytes())?)
}

/// A projection's colour, the same in every picture.
fn projection_colour(module: &str) -> RGBColor {
    let projection = module.rsplit('.').next().unwrap_or(module);
    match lowrank_core::lora::ALL_LINEAR
        .iter()
        .position(|p| *p == projection)
    {
        Some(i) => {
            let c = Palette99::pick(i).to_rgba();
            RGBColor(c.0, c.1, c.2)
        }
        None => RGBColor(90, 90, 90),
    }
}

/// σᵢ against i for every module, log scale.
pub fn spectrum_svg(title: &str, modules: &[ModuleSpectrum]) -> Result<String> {
    let err = plot_error("spectrum.svg");
    let largest = modules
        .iter()
        .flat_map(|m| m.singular_values.iter().copied())
        .fold(0.0, f64::max);
    let floor = largest * DRAW_FLOOR;
    let drawn = |m: &ModuleSpectrum| -> Vec<(f64, f64)> {
        m.singular_values
            .iter()
            .enumerate()
            .filter(|(_, s)| **s > floor && **s > 0.0)
            .map(|(i, s)| ((i + 1) as f64, *s))
            .collect()
    };
    let smallest = modules
        .iter()
        .flat_map(drawn)
        .map(|(_, s)| s)
        .fold(f64::INFINITY, f64::min);
    let (lo, hi) = if smallest.is_finite() {
        (smallest / 1.5, largest * 1.5)
    } else {
        (1e-3, 1.0)
    };
    let longest = modules
        .iter()
        .map(|m| m.singular_values.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(15)
            // Room for the legend right of the curves, so it hides none of them.
            .margin_right(LEGEND_WIDTH)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.5..longest as f64 + 0.5, (lo..hi).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("i (singular value index)")
            .y_desc("σᵢ of ΔW (log scale)")
            .x_labels(longest.min(16) + 1)
            .x_label_formatter(&integer_label)
            .light_line_style(WHITE)
            .draw()
            .map_err(|e| err(&e))?;
        let mut projections: Vec<(String, RGBColor)> = Vec::new();
        for m in modules {
            let points = drawn(m);
            let colour = projection_colour(&m.module);
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(1),
                ))
                .map_err(|e| err(&e))?;
            let projection = m.module.rsplit('.').next().unwrap_or(&m.module).to_string();
            if !projections.iter().any(|(p, _)| *p == projection) {
                projections.push((projection, colour));
            }
            // Short spectra get markers, so a rank-1 update (one point) is visible.
            if points.len() <= 32 {
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 2, colour.filled())))
                    .map_err(|e| err(&e))?;
            }
        }
        // The legend, one line per projection, in the margin right of the chart.
        let (width, _) = root.dim_in_pixel();
        let x = (width - LEGEND_WIDTH) as i32 + 5;
        for (row, (projection, colour)) in projections.iter().enumerate() {
            let y = 60 + 20 * row as i32;
            root.draw(&PathElement::new(
                vec![(x, y), (x + 20, y)],
                colour.stroke_width(2),
            ))
            .map_err(|e| err(&e))?;
            root.draw(&Text::new(
                projection.clone(),
                (x + 26, y - 7),
                ("sans-serif", 13),
            ))
            .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

/// An axis label only at whole numbers (the cells and indices are integers).
fn integer_label(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round())
    } else {
        String::new()
    }
}

/// White (φ = 0) to dark blue (φ = 1).
fn heat(phi: f64) -> RGBColor {
    let t = phi.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(lerp(255.0, 8.0), lerp(255.0, 48.0), lerp(255.0, 107.0))
}

/// Two heat maps of φ(i, j), averaged over the compared modules: right singular vectors (input
/// space) and left (output space). `ours` and `theirs` name the two adapters on the axes.
pub fn similarity_svg(comparison: &Comparison, ours: &str, theirs: &str) -> Result<String> {
    let err = plot_error("similarity.svg");
    let n = comparison.modules.len();
    let panels = [
        (
            "right singular vectors (input space)",
            mean_grid(comparison.modules.iter().map(|m| &m.right.phi)),
        ),
        (
            "left singular vectors (output space)",
            mean_grid(comparison.modules.iter().map(|m| &m.left.phi)),
        ),
    ];
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let root = root
            .titled(
                &format!("subspace similarity φ(i, j), mean over {n} modules (white 0, blue 1)"),
                ("sans-serif", 18),
            )
            .map_err(|e| err(&e))?;
        for (area, (caption, grid)) in root.split_evenly((1, 2)).iter().zip(&panels) {
            let rows = grid.len().max(1);
            let cols = grid.iter().map(Vec::len).max().unwrap_or(0).max(1);
            let mut chart = ChartBuilder::on(area)
                .caption(*caption, ("sans-serif", 15))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(50)
                .build_cartesian_2d(0.5..cols as f64 + 0.5, 0.5..rows as f64 + 0.5)
                .map_err(|e| err(&e))?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_desc(format!("j: top j directions of {theirs}"))
                .y_desc(format!("i: top i directions of {ours}"))
                .x_labels(cols.min(16) + 1)
                .y_labels(rows.min(16) + 1)
                .x_label_formatter(&integer_label)
                .y_label_formatter(&integer_label)
                .draw()
                .map_err(|e| err(&e))?;
            let cells = grid.iter().enumerate().flat_map(|(i, row)| {
                row.iter()
                    .enumerate()
                    .map(move |(j, phi)| (i + 1, j + 1, *phi))
            });
            chart
                .draw_series(cells.clone().map(|(i, j, phi)| {
                    let (x, y) = (j as f64, i as f64);
                    Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], heat(phi).filled())
                }))
                .map_err(|e| err(&e))?;
            // Values in the cells while they are large enough to read.
            if rows * cols <= 100 {
                chart
                    .draw_series(cells.map(|(i, j, phi)| {
                        let colour = if phi > 0.55 { WHITE } else { BLACK };
                        Text::new(
                            format!("{phi:.2}"),
                            (j as f64 - 0.25, i as f64),
                            ("sans-serif", 11).into_font().color(&colour),
                        )
                    }))
                    .map_err(|e| err(&e))?;
            }
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analyze::report::{
        ModuleSimilarity, SideSummary, SimilarityGrid, SimilaritySummary,
    };
    use crate::analyze::stats::module_spectrum;

    #[test]
    fn spectrum_draws_one_series_per_module_with_a_legend_per_projection() {
        let modules: Vec<ModuleSpectrum> = [
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.0.mlp.up_proj",
        ]
        .iter()
        .map(|name| module_spectrum(name, (8, 8), Some(3), vec![2.0, 0.5, 0.0], 4.25, true))
        .collect();
        let svg = spectrum_svg("test spectrum", &modules).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("test spectrum") && svg.contains("q_proj") && svg.contains("up_proj"));
        // A marker per non-zero σ: 3 modules × 2.
        assert_eq!(svg.matches("<circle").count(), 6);
        // A zero spectrum still draws (an empty chart), not an error.
        let zero = module_spectrum("m.k_proj", (4, 4), Some(1), vec![0.0], 0.0, true);
        assert!(spectrum_svg("zero", &[zero]).unwrap().contains("<svg"));
    }

    #[test]
    fn similarity_draws_a_cell_per_phi() {
        let grid = |phi: Vec<Vec<f64>>| SimilarityGrid {
            top_direction: phi[0][0],
            whole_subspace: 0.5,
            random_whole_subspace: 0.1,
            phi,
        };
        let side = SideSummary {
            mean_top_direction: 0.0,
            mean_whole_subspace: 0.0,
            mean_random_whole_subspace: 0.0,
        };
        let comparison = Comparison {
            other: "b".into(),
            other_method: "LoRA".into(),
            modules: vec![ModuleSimilarity {
                module: "m.q_proj".into(),
                rank: 2,
                other_rank: 3,
                right: grid(vec![vec![1.0, 0.5, 0.25], vec![0.5, 0.5, 0.5]]),
                left: grid(vec![vec![0.0, 0.0, 0.0], vec![0.0, 0.0, 0.0]]),
            }],
            unmatched_modules: vec![],
            summary: SimilaritySummary {
                modules: 1,
                right: side,
                left: side,
            },
        };
        let svg = similarity_svg(&comparison, "r2", "r3").unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("top j directions of r3"));
        assert!(svg.contains("0.25") && svg.contains("1.00"));
        // 2 panels × 6 cells, each a filled rect (plus the white background).
        assert!(
            svg.matches("<rect").count() >= 12,
            "{}",
            svg.matches("<rect").count()
        );
    }
}
