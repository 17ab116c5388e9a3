//! External services: the ones the current policy registers, each
//! appliance's WireGuard public key (what the service's operator configures),
//! and a form that registers a new service as a policy change — checked,
//! previewed and applied like any other.

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    Form,
};
use maud::{html, Markup};
use serde::Deserialize;

use airlock_policy::model::{PortDef, ServiceDef};
use airlock_proto::admin::{ApplianceState, PolicyFormat, PolicyProblem};

use crate::{
    auth::Action,
    state::AppState,
    ui::{
        layout::{self, Nav},
        Page, PageErr, St, Viewer,
    },
};

/// The registration form (also its redisplay after problems).
#[derive(Debug, Deserialize, Default)]
pub struct ServiceForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    endpoint: String,
    #[serde(default)]
    public_key: String,
    #[serde(default)]
    addresses: String,
    #[serde(default)]
    ports: String,
    #[serde(default)]
    data_use: String,
}

const FIELDS: &[(&str, &str, &str)] = &[
    ("name", "Name", "Unique, e.g. regional-lab."),
    (
        "endpoint",
        "WireGuard endpoint",
        "host:port of the service's WireGuard listener, e.g. 203.0.113.10:51820.",
    ),
    (
        "public_key",
        "Service's WireGuard public key",
        "Base64, 44 characters, from the service's operator.",
    ),
    (
        "addresses",
        "Destination addresses",
        "Single addresses inside the tunnel, separated by spaces or commas.",
    ),
    ("ports", "What may be sent", "e.g. tcp/443, udp/5000, icmp."),
    ("data_use", "What the data is used for", "Shown to approvers of each push."),
];

impl ServiceForm {
    fn value(&self, field: &str) -> &str {
        match field {
            "name" => &self.name,
            "endpoint" => &self.endpoint,
            "public_key" => &self.public_key,
            "addresses" => &self.addresses,
            "ports" => &self.ports,
            _ => &self.data_use,
        }
    }
}

/// `tcp/443, udp/53, icmp` → port definitions, or what is wrong.
pub fn parse_ports(s: &str) -> Result<Vec<PortDef>, String> {
    let mut out = Vec::new();
    for item in s.split([',', ' ']).map(str::trim).filter(|i| !i.is_empty()) {
        let (proto, port) = match item.split_once('/') {
            Some((p, n)) => (p, Some(n)),
            None => (item, None),
        };
        let proto = proto.to_ascii_lowercase();
        let port = match port {
            Some(n) => {
                Some(n.parse::<u16>().map_err(|_| format!("{item:?}: the port must be 1–65535"))?)
            }
            None => None,
        };
        out.push(PortDef { proto, port });
    }
    if out.is_empty() {
        return Err("name at least one protocol, e.g. tcp/443".into());
    }
    Ok(out)
}

/// The current policy text with `svc` appended, in its own format.
pub fn with_service(text: &str, format: PolicyFormat, svc: &ServiceDef) -> Result<String, String> {
    match format {
        PolicyFormat::Toml => {
            #[derive(serde::Serialize)]
            struct One<'a> {
                service: [&'a ServiceDef; 1],
            }
            let block = toml::to_string(&One { service: [svc] }).map_err(|e| e.to_string())?;
            let sep = if text.ends_with('\n') { "\n" } else { "\n\n" };
            Ok(format!("{text}{sep}{block}"))
        }
        PolicyFormat::Json => {
            let mut v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
            let obj = v.as_object_mut().ok_or("the policy is not a JSON object")?;
            let list = obj.entry("service").or_insert_with(|| serde_json::Value::Array(vec![]));
            let arr = list.as_array_mut().ok_or("\"service\" is not a list")?;
            arr.push(serde_json::to_value(svc).map_err(|e| e.to_string())?);
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())
        }
    }
}

fn page_body(
    st: &AppState,
    v: &Viewer,
    form: &ServiceForm,
    errors: &[(String, String)],
) -> Result<Markup, PageErr> {
    let now = st.now();
    let checked = st.policies.current_checked()?;
    let cur = checked.is_some().then_some(());
    let services = checked.as_ref().map_or(&[][..], |c| c.0.services.as_slice());
    let appliances = st.appliances.list().map_err(PageErr::from)?;
    let field_error = |f: &str| errors.iter().find(|(k, _)| k == f).map(|(_, m)| m.clone());
    let general: Vec<&String> = errors
        .iter()
        .filter(|(k, _)| !FIELDS.iter().any(|(f, _, _)| f == k))
        .map(|(_, m)| m)
        .collect();
    Ok(layout::page(
        v,
        Nav::Services,
        "External services",
        html! {
            h1 { "External services" }
            p { "Pushes leave the patient network only to these services, each through its own WireGuard tunnel." }
            @if services.is_empty() { p.empty { "The current policy registers no external service." } }
            @else {
                div.table-wrap { table {
                    thead { tr { th scope="col" { "Service" } th scope="col" { "Endpoint" } th scope="col" { "Destinations" } th scope="col" { "Allowed" } th scope="col" { "Public key" } th scope="col" { "Data use" } } }
                    tbody { @for s in services { tr {
                        th scope="row" { (s.name) }
                        td.mono { (s.endpoint) }
                        td.mono { (s.addresses.join(", ")) }
                        td { @for (i, p) in s.ports.iter().enumerate() { @if i > 0 { ", " } (p.proto) @if let Some(n) = p.port { "/" (n) } } }
                        td.mono { (s.public_key) }
                        td { (s.data_use) }
                    } } }
                } }
            }
            h2 #keys { "Appliances' WireGuard public keys" }
            p.hint { "Give a service's operator the key of each appliance that pushes to it. Keys are generated on the appliances; private keys never leave them." }
            div.table-wrap { table {
                thead { tr { th scope="col" { "Appliance" } th scope="col" { "Public key" } th scope="col" { "Reported" } } }
                tbody {
                    @for a in appliances.iter().filter(|a| a.state == ApplianceState::Enrolled) {
                        @let rep = st.hub.inspect(&a.id, |r, _| r.map(|(r, t)| (r.wireguard_public_key.clone(), t)));
                        tr {
                            th scope="row" { a href={ "/appliances/" (a.id) } { (a.id) } }
                            td.mono { @match rep.as_ref().and_then(|(k, _)| k.clone()) { Some(k) => (k), None => span.empty { "not reported yet" } } }
                            td { @match rep { Some((_, t)) => (layout::when(now, t)), None => span.empty { "never" } } }
                        }
                    }
                }
            } }
            @if v.may(Action::WritePolicy) {
                h2 #register { "Register a service" }
                p { "Registering adds a " code { "[[service]]" } " to the policy. You review the change before it applies; no flow opens until a flow or an approved push names the service." }
                @if cur.is_none() { p.notice.warn { "Apply a first policy before registering services." } }
                @if !general.is_empty() {
                    div.notice.bad role="alert" { p { strong { "The service cannot be registered:" } } ul { @for m in &general { li { (m) } } } }
                }
                form.stack method="post" action="/services/preview" {
                    input type="hidden" name="csrf" value=(v.csrf);
                    @for (f, label, hint) in FIELDS {
                        @let err = field_error(f);
                        div {
                            label for={ "svc-" (f) } { (label) }
                            input id={ "svc-" (f) } type="text" name=(f) value=(form.value(f))
                                required[*f != "data_use"] autocomplete="off" spellcheck="false"
                                aria-invalid=[err.as_ref().map(|_| "true")]
                                aria-describedby={ "svc-" (f) "-hint" @if err.is_some() { " svc-" (f) "-err" } };
                            div.hint id={ "svc-" (f) "-hint" } { (hint) }
                            @if let Some(e) = err { div.field-error id={ "svc-" (f) "-err" } role="alert" { (e) } }
                        }
                    }
                    div.actions { button type="submit" disabled[cur.is_none()] { "Check and preview" } }
                }
            }
        },
    ))
}

/// `GET /services`.
pub async fn page(State(st): St, v: Viewer) -> Page {
    v.require(Action::ReadPolicy)?;
    page_body(&st, &v, &ServiceForm::default(), &[])
}

/// Problems of the new service (`service[i].field`) mapped to form fields.
fn field_errors(problems: &[PolicyProblem], index: usize) -> Vec<(String, String)> {
    let prefix = format!("service[{index}]");
    problems
        .iter()
        .map(|p| {
            let msg = match &p.hint {
                Some(h) => format!("{} — {h}", p.message),
                None => p.message.clone(),
            };
            match p.path.strip_prefix(&prefix) {
                Some(rest) => {
                    let field = rest.trim_start_matches('.').split(['[', '.']).next().unwrap_or("");
                    let field =
                        if FIELDS.iter().any(|(f, _, _)| *f == field) { field } else { "name" };
                    (field.to_owned(), msg)
                }
                None => (String::new(), format!("{}: {msg}", p.path)),
            }
        })
        .collect()
}

/// `POST /services/preview`: the policy with the service added, checked and
/// shown as a diff to apply (or the form with its problems).
pub async fn preview(
    State(st): St,
    v: Viewer,
    Form(f): Form<ServiceForm>,
) -> Result<Response, PageErr> {
    v.check_csrf(&f.csrf)?;
    v.require(Action::WritePolicy)?;
    let Some(cur) = st.policies.current()? else {
        return Err(PageErr::BadRequest(
            "Apply a first policy before registering services.".into(),
        ));
    };
    let ports = match parse_ports(&f.ports) {
        Ok(p) => p,
        Err(e) => {
            let errs = vec![("ports".to_owned(), e)];
            return Ok(
                (StatusCode::UNPROCESSABLE_ENTITY, page_body(&st, &v, &f, &errs)?).into_response()
            );
        }
    };
    let svc = ServiceDef {
        name: f.name.trim().to_owned(),
        endpoint: f.endpoint.trim().to_owned(),
        public_key: f.public_key.trim().to_owned(),
        addresses: f
            .addresses
            .split([',', ' '])
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect(),
        ports,
        data_use: f.data_use.trim().to_owned(),
    };
    let index = st.policies.current_checked()?.map_or(0, |c| c.0.services.len());
    let text = with_service(&cur.text, cur.format, &svc)
        .map_err(|e| PageErr::BadRequest(format!("The current policy cannot be extended: {e}")))?;
    match crate::policy::check(&text, cur.format) {
        Err(crate::policy::PolicyError::Invalid(problems)) => {
            let errs = field_errors(&problems, index);
            Ok((StatusCode::UNPROCESSABLE_ENTITY, page_body(&st, &v, &f, &errs)?).into_response())
        }
        Err(e) => Err(e.into()),
        Ok(_) => {
            let comment = format!("register external service {}", svc.name);
            let d = super::policy::Draft {
                text: &text,
                format: cur.format,
                comment: &comment,
                base: Some(cur.version),
            };
            Ok(super::policy::check_and_preview(&st, &v, &d, None, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_with_clear_errors() {
        let p = parse_ports("tcp/443, udp/53 icmp").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0], PortDef { proto: "tcp".into(), port: Some(443) });
        assert_eq!(p[2], PortDef { proto: "icmp".into(), port: None });
        assert!(parse_ports("tcp/99999").unwrap_err().contains("1–65535"));
        assert!(parse_ports(" , ").is_err());
    }

    #[test]
    fn a_service_appends_to_toml_and_json() {
        let svc = ServiceDef {
            name: "x\"y".into(),
            endpoint: "192.0.2.1:51820".into(),
            public_key: "k".into(),
            addresses: vec!["192.0.2.1".into()],
            ports: vec![PortDef { proto: "tcp".into(), port: Some(443) }],
            data_use: String::new(),
        };
        let t = with_service("version = 1\n", PolicyFormat::Toml, &svc).unwrap();
        let back: toml::Value = toml::from_str(&t).unwrap();
        assert_eq!(back["service"][0]["name"].as_str(), Some("x\"y"), "quoted safely: {t}");
        assert_eq!(back["service"][0]["ports"][0]["port"].as_integer(), Some(443));
        let j = with_service("{\"version\": 1}", PolicyFormat::Json, &svc).unwrap();
        let back: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(back["service"][0]["endpoint"], "192.0.2.1:51820");
        assert!(with_service("[]", PolicyFormat::Json, &svc).is_err());
    }

    #[test]
    fn problems_map_to_fields() {
        let p = |path: &str| PolicyProblem {
            line: None,
            column: None,
            path: path.into(),
            message: "bad".into(),
            hint: None,
        };
        let e = field_errors(
            &[p("service[2].public_key"), p("service[2].ports[0].port"), p("flow[1].to")],
            2,
        );
        assert_eq!(e[0].0, "public_key");
        assert_eq!(e[1].0, "ports");
        assert_eq!(e[2], (String::new(), "flow[1].to: bad".into()));
    }
}
