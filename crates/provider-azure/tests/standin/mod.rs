//! A stand-in for Azure on 127.0.0.1: ARM (one scale set, Uniform or Flexible, with its
//! instances, network interfaces, public IPs, a gallery and long-running operations), the
//! instance metadata service's token endpoint and the Entra login endpoint. Answers are
//! built from the recorded payloads in `tests/fixtures/` (see `tests/fixtures/PROVENANCE.md`)
//! with names, ids and states filled in. Every request is recorded for contract checks;
//! faults (429 storms, 5xx, 403, failing operations, revoked tokens) are scripted per test.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub const SUBSCRIPTION: &str = "00000000-0000-0000-0000-000000000000";
pub const RESOURCE_GROUP: &str = "gitlab-runner-test";
pub const SCALE_SET: &str = "podman-executors";
pub const TENANT: &str = "11111111-1111-1111-1111-111111111111";
pub const GALLERY_DEFINITION: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/gallery-rg/providers/Microsoft.Compute/galleries/podfleet/images/podman-executor";

pub fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `responses.<code>.body` of a recorded example.
pub fn recorded_body(name: &str, code: &str) -> Value {
    fixture(name)["responses"][code]["body"].clone()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Uniform,
    Flexible,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmState {
    Creating { lists_left: u32 },
    Running,
    Failed(String),
    Deallocated,
    Deleting,
}

#[derive(Clone, Debug)]
pub struct Vm {
    pub name: String,
    pub index: u64,
    pub state: VmState,
    pub image_version: String,
    pub latest_model: bool,
    /// The scale-out that created it has completed.
    pub operation_done: bool,
}

#[derive(Clone, Debug)]
pub struct Recorded {
    pub at: std::time::Instant,
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub headers: HashMap<String, String>,
    pub body: Option<Value>,
}

/// A scripted answer for the next `times` requests that match.
#[derive(Clone, Debug)]
pub struct Fault {
    pub method: Option<&'static str>,
    pub path_contains: String,
    pub times: u32,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// What the next scale-out's operation does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScaleOutOutcome {
    Succeed,
    /// The operation fails (quota) and no instance is created.
    FailQuota,
    /// The instances are created but end in a failed provisioning state.
    FailInstances,
}

#[derive(Clone, Debug)]
struct PendingOp {
    polls_left: u32,
    kind: OpKind,
}

#[derive(Clone, Debug)]
enum OpKind {
    ScaleOut {
        vms: Vec<String>,
        outcome: ScaleOutOutcome,
    },
    Delete {
        vms: Vec<String>,
    },
    Capacity,
}

pub struct CloudState {
    pub mode: Mode,
    pub base: String,
    pub capacity: usize,
    pub etag: u64,
    pub model_version: String,
    pub vms: BTreeMap<String, Vm>,
    pub next_index: u64,
    operations: HashMap<String, PendingOp>,
    next_operation: u64,
    pub requests: Vec<Recorded>,
    pub faults: Vec<Fault>,
    pub valid_tokens: Vec<String>,
    pub tokens_issued: u64,
    pub token_lifetime_seconds: u64,
    pub imds_enabled: bool,
    /// Identity query parameter IMDS insists on (user-assigned identity), if any.
    pub imds_identity: Option<(String, String)>,
    pub client_secret: String,
    pub federated_assertion: String,
    /// ARM actions the identity lacks.
    pub denied: Vec<(&'static str, String, &'static str)>,
    pub next_scale_out: ScaleOutOutcome,
    pub lists_to_boot: u32,
    pub polls_per_operation: u32,
    pub page_size: usize,
    /// Slows the client down: `x-ms-ratelimit-remaining-resource` on every answer.
    pub remaining_resource: Option<u64>,
    pub gallery_versions: Vec<String>,
    /// Gallery versions still replicating to the scale set's region.
    pub replicating: Vec<String>,
    /// Concurrent capacity writes seen (If-Match mismatches answered 412).
    pub precondition_failures: u32,
    pub deleted: Vec<String>,
    /// Per instance, the states it was listed in (kept after deletion).
    pub history: BTreeMap<String, Vec<String>>,
    pub force_deleted: Vec<String>,
}

#[derive(Clone)]
pub struct Cloud {
    pub state: Arc<Mutex<CloudState>>,
    pub base: String,
    server: Arc<tokio::task::JoinHandle<()>>,
}

impl Cloud {
    pub async fn start(mode: Mode) -> Cloud {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(CloudState {
            mode,
            base: base.clone(),
            capacity: 0,
            etag: 1,
            model_version: "1.0.0".into(),
            vms: BTreeMap::new(),
            next_index: 0,
            operations: HashMap::new(),
            next_operation: 0,
            requests: Vec::new(),
            faults: Vec::new(),
            valid_tokens: Vec::new(),
            tokens_issued: 0,
            token_lifetime_seconds: 3599,
            imds_enabled: true,
            imds_identity: None,
            client_secret: "s3cr3t-value".into(),
            federated_assertion: "eyJhbGciOiJSUzI1NiJ9.federated.sig".into(),
            denied: Vec::new(),
            next_scale_out: ScaleOutOutcome::Succeed,
            lists_to_boot: 1,
            polls_per_operation: 1,
            page_size: 2,
            remaining_resource: None,
            gallery_versions: vec!["1.0.0".into(), "1.1.0".into()],
            replicating: Vec::new(),
            precondition_failures: 0,
            deleted: Vec::new(),
            history: BTreeMap::new(),
            force_deleted: Vec::new(),
        }));
        let app = axum::Router::new().fallback({
            let state = state.clone();
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move { handle(&state, method, uri, headers, body) }
            }
        });
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Cloud {
            state,
            base,
            server: Arc::new(server),
        }
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut CloudState) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.with(|s| s.requests.clone())
    }

    /// ARM requests only (not IMDS or login).
    pub fn arm_requests(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.starts_with("/subscriptions/"))
            .collect()
    }

    pub fn clear_requests(&self) {
        self.with(|s| s.requests.clear());
    }

    pub fn fault(&self, fault: Fault) {
        self.with(|s| s.faults.push(fault));
    }

    /// Adds `count` instances that exist before the manager starts.
    pub fn add_running(&self, count: usize) {
        self.with(|s| {
            for _ in 0..count {
                let name = s.new_vm(VmState::Running);
                s.vms.get_mut(&name).unwrap().state = VmState::Running;
                s.capacity += 1;
            }
        });
    }

    pub fn scale_set_id() -> String {
        format!(
            "/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Compute/virtualMachineScaleSets/{SCALE_SET}"
        )
    }

    pub fn plugin_config(&self) -> serde_json::Map<String, Value> {
        let mut config = serde_json::Map::new();
        config.insert("name".into(), json!(SCALE_SET));
        config.insert("subscription_id".into(), json!(SUBSCRIPTION));
        config.insert("resource_group_name".into(), json!(RESOURCE_GROUP));
        config.insert("arm_endpoint".into(), json!(self.base));
        config.insert("imds_endpoint".into(), json!(self.base));
        config.insert("login_endpoint".into(), json!(self.base));
        // No `az` on test machines: a missing program makes the CLI credential unavailable.
        config.insert("azure_cli".into(), json!("/nonexistent/az"));
        config
    }
}

impl CloudState {
    fn new_vm(&mut self, state: VmState) -> String {
        let index = self.next_index;
        self.next_index += 1;
        let name = match self.mode {
            Mode::Uniform => index.to_string(),
            Mode::Flexible => format!("{SCALE_SET}_{index:x}"),
        };
        self.vms.insert(
            name.clone(),
            Vm {
                name: name.clone(),
                index,
                state,
                image_version: self.model_version.clone(),
                latest_model: true,
                operation_done: false,
            },
        );
        name
    }

    fn operation_url(&mut self, kind: OpKind) -> String {
        self.next_operation += 1;
        let id = format!("op-{}", self.next_operation);
        self.operations.insert(
            id.clone(),
            PendingOp {
                polls_left: self.polls_per_operation,
                kind,
            },
        );
        format!(
            "{}/subscriptions/{SUBSCRIPTION}/providers/Microsoft.Compute/locations/westus/operations/{id}?api-version=2024-11-01",
            self.base
        )
    }

    pub fn live_vms(&self) -> usize {
        self.vms
            .values()
            .filter(|vm| vm.state != VmState::Deleting)
            .count()
    }
}

fn json_response(status: u16, headers: Vec<(String, String)>, body: Value) -> Response {
    let mut response = (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json; charset=utf-8")],
        if body.is_null() {
            String::new()
        } else {
            body.to_string()
        },
    )
        .into_response();
    for (name, value) in headers {
        response.headers_mut().insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    response
}

fn arm_error(status: u16, code: &str, message: &str) -> Response {
    json_response(
        status,
        vec![],
        json!({ "error": { "code": code, "message": message } }),
    )
}

fn handle(
    state: &Arc<Mutex<CloudState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut s = state.lock().unwrap();
    let path = uri.path().to_string();
    let query: BTreeMap<String, String> = uri
        .query()
        .map(|q| {
            q.split('&')
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (decode(k), decode(v))
                })
                .collect()
        })
        .unwrap_or_default();
    let header_map: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let text = String::from_utf8_lossy(&body).to_string();
    let json_body = serde_json::from_str::<Value>(&text).ok();
    s.requests.push(Recorded {
        at: std::time::Instant::now(),
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        headers: header_map.clone(),
        body: json_body
            .clone()
            .or_else(|| (!text.is_empty()).then(|| Value::String(text.clone()))),
    });

    if let Some(index) = s.faults.iter().position(|f| {
        f.times > 0
            && f.method.is_none_or(|m| m == method.as_str())
            && path.contains(&f.path_contains)
    }) {
        let fault = &mut s.faults[index];
        fault.times -= 1;
        let mut response = json_response(fault.status, fault.headers.clone(), Value::Null);
        *response.body_mut() = axum::body::Body::from(fault.body.clone());
        return response;
    }

    if path == "/metadata/identity/oauth2/token" {
        return imds(&mut s, &query, &header_map);
    }
    if path.ends_with("/oauth2/v2.0/token") {
        return login(&mut s, &path, &text);
    }

    // ARM: bearer token first.
    let token = header_map
        .get("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !s.valid_tokens.iter().any(|t| t == token) {
        return arm_error(
            401,
            "ExpiredAuthenticationToken",
            "The access token expiry UTC time is earlier than current UTC time.",
        );
    }
    if let Some((_, _, action)) = s
        .denied
        .iter()
        .find(|(m, p, _)| *m == method.as_str() && path.ends_with(p.as_str()))
        .cloned()
    {
        return arm_error(
            403,
            "AuthorizationFailed",
            &format!(
                "The client 'podfleet' with object id '22222222-2222-2222-2222-222222222222' does not have authorization to perform action '{action}' over scope '{path}' or the scope is invalid. If access was recently granted, please refresh your credentials."
            ),
        );
    }
    let mut response = arm(&mut s, &method, &path, &query, &header_map, json_body);
    if let Some(remaining) = s.remaining_resource {
        response.headers_mut().insert(
            "x-ms-ratelimit-remaining-resource",
            format!("Microsoft.Compute/HighCostGet;{remaining},Microsoft.Compute/LowCostGet;999")
                .parse()
                .unwrap(),
        );
    }
    response.headers_mut().insert(
        "x-ms-request-id",
        "33333333-3333-3333-3333-333333333333".parse().unwrap(),
    );
    response
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

fn issue_token(s: &mut CloudState) -> (String, u64) {
    s.tokens_issued += 1;
    let token = format!("token-{}", s.tokens_issued);
    s.valid_tokens.push(token.clone());
    (token, s.token_lifetime_seconds)
}

fn imds(
    s: &mut CloudState,
    query: &BTreeMap<String, String>,
    headers: &HashMap<String, String>,
) -> Response {
    if !s.imds_enabled {
        return json_response(
            400,
            vec![],
            json!({"error":"invalid_request","error_description":"Identity not found"}),
        );
    }
    if headers.get("metadata").map(String::as_str) != Some("true") {
        return json_response(
            400,
            vec![],
            json!({"error":"invalid_request","error_description":"Required metadata header not specified"}),
        );
    }
    if query.get("api-version").map(String::as_str) != Some("2018-02-01")
        || query.get("resource").map(String::as_str) != Some("https://management.azure.com/")
    {
        return json_response(
            400,
            vec![],
            json!({"error":"invalid_request","error_description":"bad api-version or resource"}),
        );
    }
    if let Some((key, value)) = &s.imds_identity
        && query.get(key) != Some(value)
    {
        return json_response(
            400,
            vec![],
            json!({"error":"invalid_request","error_description":"Identity not found"}),
        );
    }
    let (token, lifetime) = issue_token(s);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // IMDS sends the numbers as strings.
    json_response(
        200,
        vec![],
        json!({
            "access_token": token,
            "refresh_token": "",
            "expires_in": lifetime.to_string(),
            "expires_on": (now + lifetime).to_string(),
            "not_before": now.to_string(),
            "resource": "https://management.azure.com/",
            "token_type": "Bearer"
        }),
    )
}

fn login(s: &mut CloudState, path: &str, body: &str) -> Response {
    let form: HashMap<String, String> = body
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect();
    let tenant_ok = path == format!("/{TENANT}/oauth2/v2.0/token");
    let scope_ok =
        form.get("scope").map(String::as_str) == Some("https://management.azure.com/.default");
    let grant_ok = form.get("grant_type").map(String::as_str) == Some("client_credentials");
    let secret_ok = form.get("client_secret") == Some(&s.client_secret);
    let assertion_ok = form.get("client_assertion_type").map(String::as_str)
        == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        && form.get("client_assertion") == Some(&s.federated_assertion);
    if !(tenant_ok && scope_ok && grant_ok && (secret_ok || assertion_ok)) {
        return json_response(
            401,
            vec![],
            json!({"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.","error_codes":[7000215]}),
        );
    }
    let (token, lifetime) = issue_token(s);
    json_response(
        200,
        vec![],
        json!({"token_type":"Bearer","expires_in":lifetime,"ext_expires_in":lifetime,"access_token":token}),
    )
}

fn scale_set_body(s: &CloudState) -> Value {
    let mut body = recorded_body("VirtualMachineScaleSets_Get.json", "200");
    let id = Cloud::scale_set_id();
    body["name"] = json!(SCALE_SET);
    body["id"] = json!(id);
    body["sku"]["capacity"] = json!(s.capacity);
    body["etag"] = json!(format!("\"{}\"", s.etag));
    let properties = &mut body["properties"];
    properties["overprovision"] = json!(false);
    properties["upgradePolicy"] = json!({ "mode": "Manual" });
    properties["provisioningState"] = json!("Succeeded");
    properties["virtualMachineProfile"]["storageProfile"]["imageReference"] =
        json!({ "id": format!("{GALLERY_DEFINITION}/versions/{}", s.model_version) });
    if s.mode == Mode::Flexible {
        properties["orchestrationMode"] = json!("Flexible");
        properties["upgradePolicy"] = Value::Null;
        properties.as_object_mut().unwrap().remove("overprovision");
        properties["virtualMachineProfile"]["storageProfile"]["osDisk"]["deleteOption"] =
            json!("Delete");
        for nic in
            properties["virtualMachineProfile"]["networkProfile"]["networkInterfaceConfigurations"]
                .as_array_mut()
                .unwrap()
        {
            nic["properties"]["deleteOption"] = json!("Delete");
        }
    }
    body
}

fn statuses(vm: &Vm) -> Vec<Value> {
    let (provisioning, power) = match &vm.state {
        VmState::Creating { .. } => (
            "ProvisioningState/creating".to_string(),
            "PowerState/starting",
        ),
        VmState::Running => (
            "ProvisioningState/succeeded".to_string(),
            "PowerState/running",
        ),
        VmState::Failed(code) => (
            format!("ProvisioningState/failed/{code}"),
            "PowerState/stopped",
        ),
        VmState::Deallocated => (
            "ProvisioningState/succeeded".to_string(),
            "PowerState/deallocated",
        ),
        VmState::Deleting => (
            "ProvisioningState/deleting".to_string(),
            "PowerState/stopping",
        ),
    };
    vec![
        json!({ "code": provisioning, "level": "Info", "displayStatus": "Provisioning state" }),
        json!({ "code": power, "level": "Info", "displayStatus": power }),
    ]
}

fn provisioning_state(vm: &Vm) -> &'static str {
    match vm.state {
        VmState::Creating { .. } => "Creating",
        VmState::Running | VmState::Deallocated => "Succeeded",
        VmState::Failed(_) => "Failed",
        VmState::Deleting => "Deleting",
    }
}

fn vm_item(s: &CloudState, vm: &Vm) -> Value {
    let rg = format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}");
    let image = json!({ "id": format!("{GALLERY_DEFINITION}/versions/{}", vm.image_version) });
    match s.mode {
        Mode::Uniform => {
            let mut item = recorded_body("VirtualMachineScaleSetVMs_Get.json", "200");
            let id = format!("{}/virtualMachines/{}", Cloud::scale_set_id(), vm.name);
            item["name"] = json!(format!("{SCALE_SET}_{}", vm.name));
            item["id"] = json!(id);
            item["instanceId"] = json!(vm.name);
            item["type"] = json!("Microsoft.Compute/virtualMachineScaleSets/virtualMachines");
            let properties = &mut item["properties"];
            properties["latestModelApplied"] = json!(vm.latest_model);
            properties["provisioningState"] = json!(provisioning_state(vm));
            properties["storageProfile"]["imageReference"] = image;
            properties["instanceView"] = json!({ "statuses": statuses(vm) });
            properties["networkProfile"]["networkInterfaces"] =
                json!([{ "id": format!("{id}/networkInterfaces/nic0") }]);
            item
        }
        Mode::Flexible => {
            let mut item = recorded_body(
                "VirtualMachines_CreateOrUpdate.InFlexibleScaleSet.json",
                "200",
            );
            item["name"] = json!(vm.name);
            item["id"] = json!(format!(
                "{rg}/providers/Microsoft.Compute/virtualMachines/{}",
                vm.name
            ));
            item["managedBy"] = json!(Cloud::scale_set_id());
            let properties = &mut item["properties"];
            properties["virtualMachineScaleSet"] = json!({ "id": Cloud::scale_set_id() });
            properties["provisioningState"] = json!(provisioning_state(vm));
            properties["storageProfile"]["imageReference"] = image;
            properties["instanceView"] = json!({ "statuses": statuses(vm) });
            properties["networkProfile"] = json!({ "networkInterfaces": [{
                "id": format!("{rg}/providers/Microsoft.Network/networkInterfaces/{}-nic", vm.name),
                "properties": { "primary": true }
            }]});
            item
        }
    }
}

fn page(s: &CloudState, items: Vec<Value>, query: &BTreeMap<String, String>, path: &str) -> Value {
    let start: usize = query
        .get("$skiptoken")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let end = (start + s.page_size).min(items.len());
    let mut body = json!({ "value": items[start.min(items.len())..end] });
    if end < items.len() {
        // Re-send the query verbatim, as ARM does; the filter keeps its spaces and quotes.
        let mut link = format!("{}{path}?", s.base);
        for (k, v) in query.iter().filter(|(k, _)| *k != "$skiptoken") {
            link.push_str(&format!("{k}={v}&"));
        }
        link.push_str(&format!("$skiptoken={end}"));
        body["nextLink"] = json!(link);
    }
    body
}

fn arm(
    s: &mut CloudState,
    method: &Method,
    path: &str,
    query: &BTreeMap<String, String>,
    headers: &HashMap<String, String>,
    body: Option<Value>,
) -> Response {
    let scale_set = Cloud::scale_set_id();
    let rg = format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}");
    let api = query.get("api-version").cloned().unwrap_or_default();
    let lower = path.to_ascii_lowercase();

    if lower.contains("/providers/microsoft.compute/locations/westus/operations/") {
        let id = path.rsplit('/').next().unwrap_or("").to_string();
        let monitor = query.contains_key("monitor");
        return poll(s, &id, monitor);
    }
    if api.is_empty() {
        return arm_error(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        );
    }
    if path.eq_ignore_ascii_case(&scale_set) {
        return match *method {
            Method::GET => json_response(200, vec![], scale_set_body(s)),
            Method::PATCH => {
                let expected = format!("\"{}\"", s.etag);
                if headers.get("if-match").is_some_and(|tag| *tag != expected) {
                    s.precondition_failures += 1;
                    return arm_error(412, "PreconditionFailed", "The ETag does not match.");
                }
                let Some(target) = body
                    .as_ref()
                    .and_then(|b| b.pointer("/sku/capacity"))
                    .and_then(Value::as_u64)
                else {
                    return arm_error(400, "InvalidParameter", "sku.capacity missing");
                };
                let target = target as usize;
                s.etag += 1;
                let live = s.live_vms();
                let mut created = Vec::new();
                let outcome = std::mem::replace(&mut s.next_scale_out, ScaleOutOutcome::Succeed);
                if target > live && outcome != ScaleOutOutcome::FailQuota {
                    for _ in live..target {
                        let lists_left = s.lists_to_boot;
                        created.push(s.new_vm(VmState::Creating { lists_left }));
                    }
                }
                s.capacity = target;
                let url = if target > live {
                    s.operation_url(OpKind::ScaleOut {
                        vms: created,
                        outcome,
                    })
                } else {
                    s.operation_url(OpKind::Capacity)
                };
                let mut answer = scale_set_body(s);
                answer["properties"]["provisioningState"] = json!("Updating");
                json_response(
                    200,
                    vec![
                        ("Azure-AsyncOperation".into(), url),
                        ("Retry-After".into(), "1".into()),
                    ],
                    answer,
                )
            }
            _ => arm_error(405, "MethodNotAllowed", "not supported by the stand-in"),
        };
    }
    if *method == Method::POST && path.eq_ignore_ascii_case(&format!("{scale_set}/delete")) {
        let ids: Vec<String> = body
            .as_ref()
            .and_then(|b| b.get("instanceIds"))
            .and_then(Value::as_array)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| id.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(unknown) = ids.iter().find(|id| !s.vms.contains_key(*id)) {
            return arm_error(404, "NotFound", &format!("instance {unknown} not found"));
        }
        let force = query.get("forceDeletion").map(String::as_str) == Some("true");
        for id in &ids {
            s.vms.get_mut(id).unwrap().state = VmState::Deleting;
            s.deleted.push(id.clone());
            if force {
                s.force_deleted.push(id.clone());
            }
        }
        s.capacity = s.capacity.saturating_sub(ids.len());
        s.etag += 1;
        let url = s.operation_url(OpKind::Delete { vms: ids });
        let location = url.replace("?api-version", "?monitor=true&api-version");
        return json_response(
            202,
            vec![
                ("location".into(), location),
                ("Retry-After".into(), "1".into()),
            ],
            Value::Null,
        );
    }
    if *method == Method::GET
        && s.mode == Mode::Uniform
        && path.eq_ignore_ascii_case(&format!("{scale_set}/virtualMachines"))
    {
        let items = list_vms(s);
        return json_response(200, vec![], page(s, items, query, path));
    }
    if *method == Method::GET
        && s.mode == Mode::Flexible
        && path.eq_ignore_ascii_case(&format!("{rg}/providers/Microsoft.Compute/virtualMachines"))
    {
        let expected = format!("'virtualMachineScaleSet/id' eq '{scale_set}'");
        if query.get("$filter") != Some(&expected) {
            return arm_error(
                400,
                "InvalidParameter",
                &format!("$filter {:?}", query.get("$filter")),
            );
        }
        let items = list_vms(s);
        return json_response(200, vec![], page(s, items, query, path));
    }
    // Uniform NICs of one instance.
    if let Some(rest) = path.strip_prefix(&format!("{scale_set}/virtualMachines/")) {
        let parts: Vec<&str> = rest.split('/').collect();
        let Some(vm) = s.vms.get(parts[0]).cloned() else {
            return arm_error(404, "NotFound", "instance not found");
        };
        if parts.len() == 2 && parts[1] == "networkInterfaces" {
            let mut body = recorded_body(
                "NetworkInterfaces_ListVirtualMachineScaleSetVMNetworkInterfaces.json",
                "200",
            );
            let nic = &mut body["value"][0];
            let nic_id = format!(
                "{scale_set}/virtualMachines/{}/networkInterfaces/nic0",
                vm.name
            );
            nic["id"] = json!(nic_id);
            nic["properties"]["primary"] = json!(true);
            nic["properties"]["virtualMachine"] =
                json!({ "id": format!("{scale_set}/virtualMachines/{}", vm.name) });
            let ip = &mut nic["properties"]["ipConfigurations"][0];
            ip["id"] = json!(format!("{nic_id}/ipConfigurations/ip1"));
            ip["properties"]["privateIPAddress"] = json!(format!("10.0.0.{}", vm.index + 4));
            ip["properties"]["publicIPAddress"]["id"] = json!(format!(
                "{nic_id}/ipConfigurations/ip1/publicIPAddresses/pub1"
            ));
            return json_response(200, vec![], body);
        }
        if parts.len() == 7 && parts[5] == "publicIPAddresses" {
            let mut body = recorded_body("PublicIPAddresses_Get.json", "200");
            body["id"] = json!(path);
            body["properties"]["ipAddress"] = json!(format!("203.0.113.{}", vm.index + 4));
            return json_response(200, vec![], body);
        }
    }
    // Flexible NIC and public IP by id.
    if let Some(name) = path.strip_prefix(&format!(
        "{rg}/providers/Microsoft.Network/networkInterfaces/"
    )) {
        let vm_name = name.trim_end_matches("-nic");
        let Some(vm) = s.vms.get(vm_name).cloned() else {
            return arm_error(404, "ResourceNotFound", "network interface not found");
        };
        let mut body = recorded_body("NetworkInterfaces_Get.json", "200");
        body["id"] = json!(path);
        body["properties"]["primary"] = json!(true);
        let configurations = body["properties"]["ipConfigurations"]
            .as_array_mut()
            .unwrap();
        configurations[0]["properties"]["primary"] = json!(true);
        configurations[0]["properties"]["privateIPAddress"] =
            json!(format!("10.1.0.{}", vm.index + 4));
        configurations[0]["properties"]["publicIPAddress"] = json!({ "id": format!("{rg}/providers/Microsoft.Network/publicIPAddresses/{}-ip", vm.name) });
        return json_response(200, vec![], body);
    }
    if let Some(name) = path.strip_prefix(&format!(
        "{rg}/providers/Microsoft.Network/publicIPAddresses/"
    )) {
        let vm_name = name.trim_end_matches("-ip");
        let Some(vm) = s.vms.get(vm_name).cloned() else {
            return arm_error(404, "ResourceNotFound", "public IP not found");
        };
        let mut body = recorded_body("PublicIPAddresses_Get.json", "200");
        body["id"] = json!(path);
        body["properties"]["ipAddress"] = json!(format!("198.51.100.{}", vm.index + 4));
        return json_response(200, vec![], body);
    }
    if let Some(version) = path.strip_prefix(&format!("{GALLERY_DEFINITION}/versions/"))
        && *method == Method::GET
    {
        if !s.gallery_versions.iter().any(|v| v == version) {
            return arm_error(404, "ResourceNotFound", "gallery image version not found");
        }
        let mut body = recorded_body("GalleryImageVersions_Get.WithReplicationStatus.json", "200");
        body["name"] = json!(version);
        body["id"] = json!(path);
        let state = if s.replicating.iter().any(|v| v == version) {
            "Replicating"
        } else {
            "Completed"
        };
        body["properties"]["replicationStatus"]["summary"][0]["state"] = json!(state);
        return json_response(200, vec![], body);
    }
    if *method == Method::GET
        && path.eq_ignore_ascii_case(&format!("{GALLERY_DEFINITION}/versions"))
    {
        let template =
            recorded_body("GalleryImageVersions_ListByGalleryImage.json", "200")["value"][0]
                .clone();
        let items: Vec<Value> = s
            .gallery_versions
            .iter()
            .map(|version| {
                let mut item = template.clone();
                item["name"] = json!(version);
                item["id"] = json!(format!("{GALLERY_DEFINITION}/versions/{version}"));
                item["properties"]["provisioningState"] = json!("Succeeded");
                item["properties"]["safetyProfile"]["reportedForPolicyViolation"] = json!(false);
                item
            })
            .collect();
        return json_response(200, vec![], page(s, items, query, path));
    }
    arm_error(
        404,
        "ResourceNotFound",
        &format!("The Resource '{path}' was not found."),
    )
}

fn list_vms(s: &mut CloudState) -> Vec<Value> {
    let names: Vec<String> = s.vms.keys().cloned().collect();
    let mut items = Vec::new();
    for name in names {
        let vm = s.vms.get(&name).unwrap().clone();
        items.push(vm_item(s, &vm));
        let word = format!("{:?}", vm.state)
            .split([' ', '('])
            .next()
            .unwrap()
            .to_string();
        s.history.entry(name.clone()).or_default().push(word);
        let vm = s.vms.get_mut(&name).unwrap();
        if let VmState::Creating { lists_left } = &mut vm.state {
            *lists_left = lists_left.saturating_sub(1);
            if *lists_left == 0 && vm.operation_done {
                vm.state = VmState::Running;
            }
        }
    }
    items
}

fn poll(s: &mut CloudState, id: &str, location: bool) -> Response {
    let Some(op) = s.operations.get_mut(id) else {
        return arm_error(404, "NotFound", "no such operation");
    };
    if op.polls_left > 0 {
        op.polls_left -= 1;
        return if location {
            json_response(202, vec![("Retry-After".into(), "1".into())], Value::Null)
        } else {
            json_response(
                200,
                vec![("Retry-After".into(), "1".into())],
                json!({ "name": id, "status": "InProgress", "startTime": "2026-12-04T18:00:00Z" }),
            )
        };
    }
    let op = s.operations.remove(id).unwrap();
    let mut failed = None;
    match op.kind {
        OpKind::ScaleOut { vms, outcome } => match outcome {
            ScaleOutOutcome::Succeed => {
                for name in vms {
                    if let Some(vm) = s.vms.get_mut(&name) {
                        vm.operation_done = true;
                        if matches!(vm.state, VmState::Creating { lists_left: 0 }) {
                            vm.state = VmState::Running;
                        }
                    }
                }
            }
            ScaleOutOutcome::FailQuota => {
                failed = Some((
                    "OperationNotAllowed",
                    "Operation could not be completed as it results in exceeding approved standardDSv3Family Cores quota.",
                ));
            }
            ScaleOutOutcome::FailInstances => {
                for name in vms {
                    if let Some(vm) = s.vms.get_mut(&name) {
                        vm.state = VmState::Failed("AllocationFailed".into());
                    }
                }
                failed = Some((
                    "AllocationFailed",
                    "Allocation failed. We do not have sufficient capacity for the requested VM size in this region.",
                ));
            }
        },
        OpKind::Delete { vms } => {
            for name in vms {
                s.vms.remove(&name);
            }
        }
        OpKind::Capacity => {}
    }
    if location {
        return json_response(200, vec![], Value::Null);
    }
    match failed {
        Some((code, message)) => json_response(
            200,
            vec![],
            json!({ "name": id, "status": "Failed", "error": { "code": code, "message": message } }),
        ),
        None => json_response(
            200,
            vec![],
            json!({ "name": id, "status": "Succeeded", "endTime": "2026-12-04T18:01:00Z" }),
        ),
    }
}

/// Short waits: one "second" of Retry-After or back-off is a millisecond.
pub fn fast_timing() -> podfleet_provider_azure::Timing {
    podfleet_provider_azure::Timing {
        second: std::time::Duration::from_millis(1),
        imds_probe_timeout: std::time::Duration::from_millis(500),
        request_timeout: std::time::Duration::from_secs(10),
        ..Default::default()
    }
}

/// A provider on the stand-in with the managed identity, as on an Azure VM.
pub async fn provider(
    cloud: &Cloud,
    extra: &[(&str, Value)],
) -> Result<podfleet_provider_azure::AzureProvider, podfleet_provider::ProviderError> {
    provider_with(cloud, extra, Default::default(), Default::default()).await
}

pub async fn provider_with(
    cloud: &Cloud,
    extra: &[(&str, Value)],
    environment: podfleet_provider_azure::AzureEnvironment,
    connector: podfleet_provider_azure::ConnectorDefaults,
) -> Result<podfleet_provider_azure::AzureProvider, podfleet_provider::ProviderError> {
    let mut config = cloud.plugin_config();
    for (key, value) in extra {
        config.insert((*key).into(), value.clone());
    }
    let settings = podfleet_provider_azure::AzureSettings::from_plugin_config(&config)?;
    podfleet_provider_azure::AzureProvider::new(settings, environment, connector, fast_timing())
        .await
}

/// Polls `condition` until it holds, for at most ten seconds.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
