//! The simulator's plots, drawn with plotters' SVG backend.

use plotters::prelude::*;

use super::fleet::Sample;

/// A line of a plot: its label, colour and value per sample.
type Series = (&'static str, RGBColor, fn(&Sample) -> f64);

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A run's timeline: demand, free capacity and unmet requests on top, hosts by state below.
pub fn render_timeline(title: &str, timeline: &[Sample]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1100, 760)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (top, bottom) = root.split_vertically(380);
        let x_max = timeline.last().map_or(1.0, |s| s.t_s / 3600.0).max(1e-3);
        let hours = |s: &Sample| s.t_s / 3600.0;

        let clients_max = timeline
            .iter()
            .map(|s| {
                s.demand
                    .max(s.free_capacity)
                    .max(u32::try_from(s.unmet_total).unwrap_or(u32::MAX))
            })
            .max()
            .unwrap_or(1)
            .max(1);
        let mut chart = ChartBuilder::on(&top)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, 0f64..f64::from(clients_max) * 1.1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("simulated time (hours)")
            .y_desc("clients / mandelbox slots")
            .draw()
            .map_err(err)?;
        let series: [Series; 3] = [
            ("demand (in session + waiting)", BLUE, |s| {
                f64::from(s.demand)
            }),
            ("free capacity (slots)", GREEN, |s| {
                f64::from(s.free_capacity)
            }),
            ("unmet requests (cumulative)", RED, |s| s.unmet_total as f64),
        ];
        for (label, colour, value) in series {
            chart
                .draw_series(LineSeries::new(
                    timeline.iter().map(|s| (hours(s), value(s))),
                    colour,
                ))
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;

        let hosts_max = timeline
            .iter()
            .map(|s| s.booting + s.active + s.draining)
            .max()
            .unwrap_or(1)
            .max(1);
        let mut chart = ChartBuilder::on(&bottom)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, 0f64..f64::from(hosts_max) * 1.1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("simulated time (hours)")
            .y_desc("hosts")
            .draw()
            .map_err(err)?;
        let series: [Series; 3] = [
            (
                "booting (launching or PRE_CONNECTION)",
                RGBColor(230, 150, 0),
                |s| f64::from(s.booting),
            ),
            ("ACTIVE", BLACK, |s| f64::from(s.active)),
            ("DRAINING", MAGENTA, |s| f64::from(s.draining)),
        ];
        for (label, colour, value) in series {
            chart
                .draw_series(LineSeries::new(
                    timeline.iter().map(|s| (hours(s), value(s))),
                    colour,
                ))
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// One point of a frontier plot: an algorithm at one setting.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontierPoint {
    pub algorithm: String,
    pub setting: String,
    pub host_hours: f64,
    pub unmet: u64,
}

/// Unmet requests against host-hours over each algorithm's settings, with the Pareto
/// frontier of all points.
pub fn render_frontier(title: &str, points: &[FrontierPoint]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let x_max = points.iter().map(|p| p.host_hours).fold(1e-3, f64::max) * 1.1;
        let y_max = points.iter().map(|p| p.unmet as f64).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("host-hours")
            .y_desc("unmet requests")
            .draw()
            .map_err(err)?;
        let colours = [(RED, "original"), (BLUE, "default"), (GREEN, "holdover")];
        for (colour, name) in colours {
            chart
                .draw_series(
                    points
                        .iter()
                        .filter(|p| p.algorithm == name)
                        .map(|p| Circle::new((p.host_hours, p.unmet as f64), 4, colour.filled())),
                )
                .map_err(err)?
                .label(name)
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, colour.filled()));
        }
        let frontier = pareto(points);
        chart
            .draw_series(LineSeries::new(
                frontier.iter().map(|p| (p.host_hours, p.unmet as f64)),
                BLACK.mix(0.6),
            ))
            .map_err(err)?
            .label("frontier (no point both cheaper and better)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.6)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// The points no other point beats on both host-hours and unmet requests, by host-hours.
pub fn pareto(points: &[FrontierPoint]) -> Vec<FrontierPoint> {
    let mut sorted: Vec<&FrontierPoint> = points.iter().collect();
    sorted.sort_by(|a, b| {
        a.host_hours
            .total_cmp(&b.host_hours)
            .then(a.unmet.cmp(&b.unmet))
    });
    let mut out: Vec<FrontierPoint> = Vec::new();
    for p in sorted {
        if out.last().is_none_or(|last| p.unmet < last.unmet) {
            out.push(p.clone());
        }
    }
    out
}
