//! Charts drawn by the server as inline SVG: no script, no external file, and they print.
//! Every label that comes from the fleet (an environment's name) is escaped here, since the
//! SVG reaches the page as markup.

use std::fmt::Write;

/// Text for SVG/HTML: `&`, `<`, `>`, `"` and `'` escaped.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Horizontal bars of percentages (0-100), one per label; a bar without a value (no hosts)
/// is drawn empty and labelled "n/a".
pub fn percent_bars(title: &str, bars: &[(String, Option<f64>)]) -> String {
    const ROW: usize = 26;
    const LABEL: usize = 150;
    const WIDTH: usize = 560;
    let plot = (WIDTH - LABEL - 70) as f64;
    let height = 30 + ROW * bars.len().max(1);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}"><title>{}</title>"#,
        esc(title)
    );
    for (i, (label, value)) in bars.iter().enumerate() {
        let y = 20 + i * ROW;
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end" class="label">{}</text><rect x="{LABEL}" y="{y}" width="{plot}" height="18" class="track"/>"#,
            LABEL - 8,
            y + 13,
            esc(label)
        );
        match value {
            Some(v) => {
                let v = v.clamp(0.0, 100.0);
                let _ = write!(
                    svg,
                    r#"<rect x="{LABEL}" y="{y}" width="{:.1}" height="18" class="{}"/><text x="{}" y="{}" class="value">{v:.1} %</text>"#,
                    plot * v / 100.0,
                    if v >= 95.0 {
                        "good"
                    } else if v >= 80.0 {
                        "fair"
                    } else {
                        "poor"
                    },
                    LABEL as f64 + plot + 6.0,
                    y + 13
                );
            }
            None => {
                let _ = write!(
                    svg,
                    r#"<text x="{}" y="{}" class="value">n/a</text>"#,
                    LABEL as f64 + plot + 6.0,
                    y + 13
                );
            }
        }
    }
    svg.push_str("</svg>");
    svg
}

/// A line of daily percentages (x: days, y: 0-100 %); days without a value break the line.
/// `points` are (day number since 1970-01-01, value), oldest first.
pub fn trend(title: &str, points: &[(i64, Option<f64>)]) -> String {
    const WIDTH: f64 = 560.0;
    const HEIGHT: f64 = 180.0;
    const LEFT: f64 = 44.0;
    const BOTTOM: f64 = 24.0;
    let plot_w = WIDTH - LEFT - 10.0;
    let plot_h = HEIGHT - BOTTOM - 10.0;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}"><title>{}</title>"#,
        esc(title)
    );
    for pct in [0, 50, 100] {
        let y = 10.0 + plot_h * (1.0 - f64::from(pct) / 100.0);
        let _ = write!(
            svg,
            r#"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" class="grid"/><text x="{:.1}" y="{:.1}" text-anchor="end" class="label">{pct} %</text>"#,
            LEFT + plot_w,
            LEFT - 4.0,
            y + 4.0
        );
    }
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        svg.push_str(r#"<text x="280" y="90" text-anchor="middle" class="label">no daily figures yet</text></svg>"#);
        return svg;
    };
    let span = (last.0 - first.0).max(1) as f64;
    let x = |day: i64| LEFT + plot_w * ((day - first.0) as f64 / span);
    let y = |v: f64| 10.0 + plot_h * (1.0 - v.clamp(0.0, 100.0) / 100.0);
    let mut segment: Vec<String> = Vec::new();
    let flush = |segment: &mut Vec<String>, svg: &mut String| {
        if segment.len() > 1 {
            let _ = write!(
                svg,
                r#"<polyline points="{}" class="line"/>"#,
                segment.join(" ")
            );
        }
        segment.clear();
    };
    for (day, value) in points {
        match value {
            Some(v) => {
                segment.push(format!("{:.1},{:.1}", x(*day), y(*v)));
                let _ = write!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" class="dot"><title>{} {v:.1} %</title></circle>"#,
                    x(*day),
                    y(*v),
                    super::day_text(*day)
                );
            }
            None => flush(&mut segment, &mut svg),
        }
    }
    flush(&mut segment, &mut svg);
    let _ = write!(
        svg,
        r#"<text x="{LEFT}" y="{:.1}" class="label">{}</text><text x="{:.1}" y="{:.1}" text-anchor="end" class="label">{}</text></svg>"#,
        HEIGHT - 6.0,
        super::day_text(first.0),
        LEFT + plot_w,
        HEIGHT - 6.0,
        super::day_text(last.0)
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_escape_labels_and_clamp() {
        let svg = percent_bars(
            "by env",
            &[
                ("<script>alert(1)</script>".into(), Some(150.0)),
                ("none".into(), None),
            ],
        );
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(svg.contains("&lt;script&gt;"), "{svg}");
        assert!(svg.contains("100.0 %"), "{svg}");
        assert!(svg.contains("n/a"), "{svg}");
    }

    #[test]
    fn trend_breaks_at_missing_days() {
        let svg = trend(
            "t",
            &[
                (1, Some(50.0)),
                (2, Some(60.0)),
                (3, None),
                (4, Some(70.0)),
                (5, Some(80.0)),
            ],
        );
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        assert_eq!(svg.matches("<circle").count(), 4, "{svg}");
        assert!(trend("t", &[]).contains("no daily figures yet"));
    }
}
