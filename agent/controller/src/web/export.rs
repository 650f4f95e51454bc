//! Audit exports of the compliance dashboard (`patchctl compliance --format csv|html`): the
//! same figures as `--format json`, as a spreadsheet or as one self-contained HTML file with
//! the dashboard's charts (styles and SVG inline, no link out), fit to print.

use super::pages::{Fleet, fleet_extras};
use crate::compliance::Dashboard;

/// The fleet page as a file: no navigation, nothing fetched.
pub fn html(fleet: &Fleet) -> Result<String, String> {
    let env = super::templates();
    let ctx = minijinja::value::merge_maps([
        minijinja::context! {
            title => "Patch compliance report",
            standalone => true,
            history => minijinja::Value::from_serialize(&fleet.history),
        },
        fleet_extras(fleet),
    ]);
    env.get_template("fleet.html")
        .and_then(|t| t.render(ctx))
        .map_err(|e| format!("cannot render the report: {e}"))
}

/// A text field from the fleet (an environment's name): a leading `=`, `+`, `-`, `@`, tab or
/// CR, which a spreadsheet would run as a formula, is neutralised with a `'`.
fn text(v: &str) -> String {
    if v.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        field(&format!("'{v}"))
    } else {
        field(v)
    }
}

/// One CSV field, quoted when it must be.
fn field(v: &str) -> String {
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

fn num<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// `scope,name,figure,value` rows: scope `fleet` (name empty), `class` (name critical..low),
/// `environment` (name the label's value). An empty value is a figure without data (no hosts,
/// no jobs). Numbers are written in full, as in the JSON.
pub fn csv(d: &Dashboard) -> String {
    let mut rows: Vec<[String; 4]> = Vec::new();
    let mut fleet = |figure: &str, value: String| {
        rows.push(["fleet".into(), String::new(), figure.into(), value]);
    };
    fleet("generated_at", d.generated_at.to_string());
    fleet("hosts", d.hosts.to_string());
    fleet("hosts_with_inventory", d.hosts_with_inventory.to_string());
    fleet("hosts_known", d.hosts_known.to_string());
    fleet("hosts_unknown", d.hosts_unknown.to_string());
    fleet(
        "hosts_unknown_scan_errors",
        d.hosts_unknown_scan_errors.to_string(),
    );
    fleet("hosts_unknown_stale", d.hosts_unknown_stale.to_string());
    fleet(
        "hosts_unknown_no_inventory",
        d.hosts_unknown_no_inventory.to_string(),
    );
    fleet("stale_after_hours", d.stale_after_hours.to_string());
    fleet("hosts_compliant", d.hosts_compliant.to_string());
    fleet(
        "overall_compliance_percent",
        num(d.overall_compliance_percent),
    );
    fleet("mean_time_to_patch_hours", num(d.mean_time_to_patch_hours));
    fleet("jobs_ran", d.jobs_ran.to_string());
    fleet("jobs_failed", d.jobs_failed.to_string());
    fleet(
        "patch_failure_rate_percent",
        num(d.patch_failure_rate_percent),
    );
    fleet("reboots", d.reboots.to_string());
    fleet("reboots_succeeded", d.reboots_succeeded.to_string());
    fleet(
        "reboot_success_rate_percent",
        num(d.reboot_success_rate_percent),
    );
    fleet("hosts_reboot_required", d.hosts_reboot_required.to_string());
    fleet("reports_dropped_progress", d.reports_dropped.0.to_string());
    fleet("reports_dropped_final", d.reports_dropped.1.to_string());
    for c in &d.by_class {
        let mut class = |figure: &str, value: String| {
            rows.push(["class".into(), c.class.into(), figure.into(), value]);
        };
        class("sla_hours", c.sla_hours.to_string());
        class("compliance_percent", num(c.compliance_percent));
        class("pending", c.pending.to_string());
        class("overdue", c.overdue.to_string());
        class("hosts_overdue", c.hosts_overdue.to_string());
        class("max_days_overdue", num(c.max_days_overdue));
        class("mean_time_to_patch_hours", num(c.mean_time_to_patch_hours));
    }
    for (name, e) in &d.by_environment {
        for (figure, value) in [
            ("hosts", e.hosts.to_string()),
            ("compliant", e.compliant.to_string()),
            ("compliance_percent", e.compliance_percent.to_string()),
        ] {
            rows.push(["environment".into(), name.clone(), figure.into(), value]);
        }
    }
    let mut out = String::from("scope,name,figure,value\n");
    for r in rows {
        let [scope, name, figure, value] = r;
        out.push_str(&format!(
            "{},{},{},{}\n",
            field(&scope),
            text(&name),
            field(&figure),
            field(&value)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_quoted_and_formulas_neutralised() {
        assert_eq!(field("prod"), "prod");
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(text("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(text("-1"), "'-1");
        assert_eq!(field("-1"), "-1");
    }
}
