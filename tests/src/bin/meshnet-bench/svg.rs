//! Hand-rolled SVG charts: line panels with error bars over a log x axis, and grouped bars.

use std::fmt::Write as _;

pub struct Svg {
    w: f64,
    h: f64,
    body: String,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

impl Svg {
    pub fn new(w: f64, h: f64) -> Self {
        Self { w, h, body: String::new() }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str, width: f64, dash: Option<&str>) {
        let dash = dash.map(|d| format!(" stroke-dasharray=\"{d}\"")).unwrap_or_default();
        let _ = writeln!(
            self.body,
            "<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"{stroke}\" stroke-width=\"{width}\"{dash}/>"
        );
    }

    pub fn polyline(&mut self, pts: &[(f64, f64)], stroke: &str, width: f64, dash: Option<&str>) {
        let p: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let dash = dash.map(|d| format!(" stroke-dasharray=\"{d}\"")).unwrap_or_default();
        let _ = writeln!(
            self.body,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{stroke}\" stroke-width=\"{width}\"{dash}/>",
            p.join(" ")
        );
    }

    pub fn circle(&mut self, x: f64, y: f64, r: f64, fill: &str) {
        let _ = writeln!(self.body, "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"{r}\" fill=\"{fill}\"/>");
    }

    pub fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str) {
        let _ = writeln!(self.body, "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{fill}\"/>");
    }

    /// `anchor`: start, middle or end.
    pub fn text(&mut self, x: f64, y: f64, size: f64, anchor: &str, s: &str) {
        let _ = writeln!(
            self.body,
            "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"{size}\" text-anchor=\"{anchor}\">{}</text>",
            esc(s)
        );
    }

    pub fn vtext(&mut self, x: f64, y: f64, size: f64, s: &str) {
        let _ = writeln!(
            self.body,
            "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"{size}\" text-anchor=\"middle\" transform=\"rotate(-90 {x:.1} {y:.1})\">{}</text>",
            esc(s)
        );
    }

    pub fn finish(self) -> String {
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{}</svg>\n",
            self.body,
            w = self.w,
            h = self.h
        )
    }
}

/// A measured point: median with its min–max spread.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub struct Series {
    pub color: &'static str,
    pub dashed: bool,
    /// One per x value; `None` leaves a gap.
    pub points: Vec<Option<Point>>,
}

/// "Nice" upper bound and tick step for an axis from 0 to `max`.
fn nice(max: f64) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

/// A panel of lines over x values placed at log10(x), with min–max error bars.
#[allow(clippy::too_many_arguments)]
pub fn line_panel(svg: &mut Svg, x0: f64, y0: f64, w: f64, h: f64, title: &str, ylabel: &str, xs: &[f64], series: &[Series]) {
    let ymax_data = series.iter().flat_map(|s| s.points.iter().flatten().map(|p| p.max)).fold(0.0, f64::max);
    let (ymax, step) = nice(ymax_data * 1.05);
    let (lx, ly) = (xs.iter().copied().map(f64::log10).fold(f64::INFINITY, f64::min), xs.iter().copied().map(f64::log10).fold(f64::NEG_INFINITY, f64::max));
    let px = |x: f64| x0 + 10.0 + (x.log10() - lx) / (ly - lx).max(1e-9) * (w - 20.0);
    let py = |y: f64| y0 + h - y / ymax * h;
    svg.text(x0 + w / 2.0, y0 - 10.0, 14.0, "middle", title);
    let mut y = 0.0;
    while y <= ymax + 1e-9 {
        svg.line(x0, py(y), x0 + w, py(y), "#e4e4e4", 1.0, None);
        svg.text(x0 - 6.0, py(y) + 4.0, 11.0, "end", &trim_num(y));
        y += step;
    }
    svg.line(x0, y0 + h, x0 + w, y0 + h, "#333", 1.0, None);
    svg.line(x0, y0, x0, y0 + h, "#333", 1.0, None);
    for &x in xs {
        svg.line(px(x), y0 + h, px(x), y0 + h + 4.0, "#333", 1.0, None);
        svg.text(px(x), y0 + h + 17.0, 11.0, "middle", &count_label(x));
    }
    svg.text(x0 + w / 2.0, y0 + h + 34.0, 12.0, "middle", "remote CIDRs in the route trie (log scale)");
    svg.vtext(x0 - 42.0, y0 + h / 2.0, 12.0, ylabel);
    for s in series {
        let dash = s.dashed.then_some("6 4");
        let pts: Vec<(f64, f64)> =
            xs.iter().zip(&s.points).filter_map(|(x, p)| p.map(|p| (px(*x), py(p.median)))).collect();
        svg.polyline(&pts, s.color, 2.0, dash);
        for (x, p) in xs.iter().zip(&s.points) {
            if let Some(p) = p {
                let cx = px(*x);
                svg.line(cx, py(p.min), cx, py(p.max), s.color, 1.0, None);
                svg.line(cx - 3.0, py(p.min), cx + 3.0, py(p.min), s.color, 1.0, None);
                svg.line(cx - 3.0, py(p.max), cx + 3.0, py(p.max), s.color, 1.0, None);
                svg.circle(cx, py(p.median), 2.5, s.color);
            }
        }
    }
}

/// A legend, one row per entry: (name, color, dashed).
pub fn legend(svg: &mut Svg, x: f64, y: f64, entries: &[(String, &str, bool)]) {
    for (i, (name, color, dashed)) in entries.iter().enumerate() {
        let yy = y + i as f64 * 17.0;
        svg.line(x, yy - 4.0, x + 26.0, yy - 4.0, color, 2.0, dashed.then_some("6 4"));
        svg.text(x + 32.0, yy, 11.0, "start", name);
    }
}

/// Grouped bars with min–max error bars and a reference line at `reference`.
pub struct BarGroup {
    pub title: String,
    /// (bar label, color, point)
    pub bars: Vec<(String, &'static str, Point)>,
}

#[allow(clippy::too_many_arguments)]
pub fn bar_panel(svg: &mut Svg, x0: f64, y0: f64, w: f64, h: f64, title: &str, ylabel: &str, reference: f64, groups: &[BarGroup]) {
    // Scaled to the medians; a wild spread is clipped at the top rather than squashing the bars.
    let top_median = groups.iter().flat_map(|g| g.bars.iter().map(|b| b.2.median)).fold(reference, f64::max);
    let top_max = groups.iter().flat_map(|g| g.bars.iter().map(|b| b.2.max)).fold(reference, f64::max);
    let ymax_data = top_max.min(top_median * 1.6);
    let (ymax, step) = nice(ymax_data * 1.08);
    let py = |y: f64| y0 + h - y.min(ymax) / ymax * h;
    svg.text(x0 + w / 2.0, y0 - 10.0, 14.0, "middle", title);
    let mut y = 0.0;
    while y <= ymax + 1e-9 {
        svg.line(x0, py(y), x0 + w, py(y), "#e4e4e4", 1.0, None);
        svg.text(x0 - 6.0, py(y) + 4.0, 11.0, "end", &trim_num(y));
        y += step;
    }
    svg.line(x0, y0 + h, x0 + w, y0 + h, "#333", 1.0, None);
    svg.line(x0, y0, x0, y0 + h, "#333", 1.0, None);
    svg.vtext(x0 - 42.0, y0 + h / 2.0, 12.0, ylabel);
    let gw = w / groups.len() as f64;
    for (gi, g) in groups.iter().enumerate() {
        let gx = x0 + gi as f64 * gw;
        let bw = (gw - 30.0) / g.bars.len().max(1) as f64;
        for (bi, (label, color, p)) in g.bars.iter().enumerate() {
            let bx = gx + 15.0 + bi as f64 * bw;
            svg.rect(bx + 2.0, py(p.median), bw - 4.0, y0 + h - py(p.median), color);
            let cx = bx + bw / 2.0;
            svg.line(cx, py(p.min), cx, py(p.max), "#222", 1.0, None);
            svg.line(cx - 3.0, py(p.min), cx + 3.0, py(p.min), "#222", 1.0, None);
            svg.line(cx - 3.0, py(p.max), cx + 3.0, py(p.max), "#222", 1.0, None);
            svg.text(cx, py(p.max) - 4.0, 10.0, "middle", &format!("{:.2}", p.median));
            let _ = label;
        }
        svg.text(gx + gw / 2.0, y0 + h + 17.0, 12.0, "middle", &g.title);
    }
    svg.line(x0, py(reference), x0 + w, py(reference), "#000", 1.5, Some("4 3"));
}

fn trim_num(y: f64) -> String {
    let s = format!("{y:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn count_label(x: f64) -> String {
    match x as u64 {
        n if n >= 1000 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_axes() {
        assert_eq!(nice(97.0), (100.0, 20.0));
        assert_eq!(nice(1.3), (1.5, 0.5));
        assert_eq!(count_label(100_000.0), "100k");
        assert_eq!(trim_num(2.50), "2.5");
    }

    #[test]
    fn renders_valid_looking_svg() {
        let mut s = Svg::new(200.0, 100.0);
        let p = Point { median: 1.0, min: 0.5, max: 1.5 };
        line_panel(&mut s, 50.0, 20.0, 100.0, 50.0, "t<1>", "ns", &[1.0, 1000.0], &[Series {
            color: "red",
            dashed: true,
            points: vec![Some(p), None],
        }]);
        let out = s.finish();
        assert!(out.starts_with("<svg") && out.trim_end().ends_with("</svg>"));
        assert!(out.contains("t&lt;1&gt;"));
    }
}
