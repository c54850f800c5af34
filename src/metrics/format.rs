//! The two exposition formats `/metrics` speaks, chosen by the scraper's `Accept` header:
//! OpenMetrics 1.0 (what `prometheus-client` writes) and the Prometheus text format 0.0.4 (the
//! default, for `curl` and older scrapers), derived from it.

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`.
    Prometheus,
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when the `Accept` header names `application/openmetrics-text` with a quality
    /// at least that of `text/plain` (or a wildcard covering it), as Prometheus itself asks;
    /// otherwise, an absent header included, the Prometheus text format.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(0.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Rewrites an OpenMetrics exposition (as `prometheus-client` writes it) in the Prometheus text
/// format: no `# EOF` or `# UNIT` lines, and a counter's `# HELP`/`# TYPE` name the series with
/// its `_total` suffix (OpenMetrics names the family without it). Samples are the same in both.
pub fn to_prometheus(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut lines = openmetrics.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            let kind = lines
                .peek()
                .and_then(|next| next.strip_prefix("# TYPE "))
                .and_then(|t| t.strip_prefix(name))
                .and_then(|t| t.strip_prefix(' '));
            if let Some(kind) = kind {
                let (renamed, kind) = prometheus_type(name, kind);
                out.push_str("# HELP ");
                out.push_str(&renamed);
                out.push_str(&rest[name.len()..]);
                out.push('\n');
                out.push_str("# TYPE ");
                out.push_str(&renamed);
                out.push(' ');
                out.push_str(kind);
                out.push('\n');
                lines.next();
                continue;
            }
        }
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            let (renamed, kind) = prometheus_type(name, kind);
            out.push_str("# TYPE ");
            out.push_str(&renamed);
            out.push(' ');
            out.push_str(kind);
            out.push('\n');
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The Prometheus name and type of an OpenMetrics family.
fn prometheus_type<'a>(name: &str, kind: &'a str) -> (String, &'a str) {
    match kind {
        "counter" => (format!("{name}_total"), "counter"),
        "info" => (format!("{name}_info"), "gauge"),
        "unknown" => (name.to_string(), "untyped"),
        other => (name.to_string(), other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_chooses_openmetrics_only_when_preferred() {
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Prometheus);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text")),
            Format::OpenMetrics
        );
        // What Prometheus 2.x and 3.x send.
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
            )),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some("text/plain;q=0.9, application/openmetrics-text;q=0.5")),
            Format::Prometheus
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Format::Prometheus
        );
    }

    #[test]
    fn counters_are_renamed_and_openmetrics_only_lines_dropped() {
        let om = "# HELP gateway_requests Requests.\n# TYPE gateway_requests counter\n\
                  gateway_requests_total{team=\"a\"} 1\n\
                  # HELP up_seconds Up.\n# TYPE up_seconds gauge\n# UNIT up_seconds seconds\nup_seconds 2\n\
                  # HELP build Build.\n# TYPE build info\nbuild_info{version=\"1\"} 1\n# EOF\n";
        assert_eq!(
            to_prometheus(om),
            "# HELP gateway_requests_total Requests.\n# TYPE gateway_requests_total counter\n\
             gateway_requests_total{team=\"a\"} 1\n\
             # HELP up_seconds Up.\n# TYPE up_seconds gauge\nup_seconds 2\n\
             # HELP build_info Build.\n# TYPE build_info gauge\nbuild_info{version=\"1\"} 1\n"
        );
    }
}
