//! Azure provider: a Virtual Machine Scale Set (Uniform or Flexible orchestration) driven
//! over ARM REST with podfleet's own token code. It lists instances with their provisioning
//! and power state, grows the set by read-modify-write of `sku.capacity` under `If-Match`
//! (concurrent increases coalesced into one write), deletes chosen instances, follows
//! long-running operations, reports failed and deallocated instances as failed so they are
//! replaced, and tells which image each instance runs.
//!
//! It knows Azure and nothing of jobs. Environment variables are read by the binary and
//! handed in as [`AzureEnvironment`].

pub mod actions;
pub mod arm;
mod images;
pub mod settings;
pub mod token;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use podfleet_provider::{
    ConnectInfo, InstanceId, InstanceImage, InstanceState, Provider, ProviderError, ProviderInfo,
    ProviderInstance,
};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use arm::{ArmClient, ArmError, ArmStats, Operation};
pub use settings::{AzureEnvironment, AzureSettings, ConnectorDefaults, CredentialKind, Timing};

/// How the scale set manages its instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Orchestration {
    /// Instances are scale-set VMs (`virtualMachineScaleSets/{name}/virtualMachines/{id}`).
    Uniform,
    /// Instances are ordinary VMs that belong to the set.
    Flexible,
}

/// One instance as the last listing showed it.
#[derive(Clone, Debug)]
struct Listed {
    state: InstanceState,
    /// The ARM item (scale-set VM or VM), for addresses and images.
    item: Value,
}

type IncreaseWaiter = (usize, oneshot::Sender<Result<usize, String>>);

struct Shared {
    settings: AzureSettings,
    connector: ConnectorDefaults,
    arm: ArmClient,
    orchestration: Orchestration,
    location: String,
    scale_set_id: String,
    /// Capacity writes and instance deletions of this scale set, one at a time.
    write_lock: tokio::sync::Mutex<()>,
    /// Increases waiting to be folded into the next capacity write.
    increase_queue: Mutex<Vec<IncreaseWaiter>>,
    instances: Mutex<HashMap<InstanceId, Listed>>,
    /// `(internal, external)` address per instance; addresses live as long as the VM.
    addresses: Mutex<HashMap<InstanceId, (String, Option<String>)>>,
    /// Long-running operations that ended in failure, newest last.
    failed_operations: Mutex<Vec<String>>,
}

pub struct AzureProvider {
    shared: Arc<Shared>,
    /// Pollers of long-running operations, stopped by [`Provider::shutdown`].
    pollers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl AzureProvider {
    /// Connects to ARM, reads the scale set and checks that podfleet can drive it: one
    /// clear error for a wrong name, a missing permission or an unsuitable scale set.
    pub async fn new(
        settings: AzureSettings,
        environment: AzureEnvironment,
        connector: ConnectorDefaults,
        timing: Timing,
    ) -> Result<Self, ProviderError> {
        let tokens = token::TokenProvider::new(&settings, &environment, &timing)
            .map_err(ProviderError::Config)?;
        let arm = ArmClient::new(&settings.arm_endpoint, tokens, timing)
            .map_err(ProviderError::Config)?;
        let scale_set_id = settings.scale_set_id();
        let op = Operation {
            what: "read scale set",
            resource: scale_set_id.clone(),
            action: "Microsoft.Compute/virtualMachineScaleSets/read",
        };
        let url = arm.url(&scale_set_id, &settings.compute_api_version, &[]);
        let scale_set = arm.get(&op, &url).await.map_err(provider_error)?;
        let orchestration = check_scale_set(&scale_set_id, &scale_set)?;
        let location = scale_set
            .get("location")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        tracing::info!(
            scale_set = %scale_set_id,
            ?orchestration,
            credential = arm.tokens().credential_in_use().unwrap_or("none"),
            "azure: scale set ready"
        );
        Ok(Self {
            shared: Arc::new(Shared {
                settings,
                connector,
                arm,
                orchestration,
                location,
                scale_set_id,
                write_lock: tokio::sync::Mutex::new(()),
                increase_queue: Mutex::new(Vec::new()),
                instances: Mutex::new(HashMap::new()),
                addresses: Mutex::new(HashMap::new()),
                failed_operations: Mutex::new(Vec::new()),
            }),
            pollers: Mutex::new(Vec::new()),
        })
    }

    pub fn orchestration(&self) -> Orchestration {
        self.shared.orchestration
    }

    /// Request counters of the ARM client.
    pub fn stats(&self) -> ArmStats {
        self.shared.arm.stats()
    }

    /// Tokens obtained so far (a cached token is not counted again).
    pub fn tokens_fetched(&self) -> u64 {
        self.shared.arm.tokens().tokens_fetched()
    }

    /// Long-running operations (scale-outs, deletions) that ended in failure.
    pub fn failed_operations(&self) -> Vec<String> {
        lock(&self.shared.failed_operations).clone()
    }

    /// Whether a long-running operation is still being followed.
    pub fn operations_pending(&self) -> bool {
        lock(&self.pollers)
            .iter()
            .any(|poller| !poller.is_finished())
    }

    fn follow(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut pollers = lock(&self.pollers);
        pollers.retain(|poller| !poller.is_finished());
        pollers.push(tokio::spawn(task));
    }
}

impl Shared {
    fn op(&self, what: &'static str, method: &str, path: &str) -> Operation {
        Operation {
            what,
            resource: path.to_string(),
            action: actions::rbac_action(method, path).unwrap_or("unknown"),
        }
    }

    fn operation_timeout(&self) -> Duration {
        Duration::from_secs(self.settings.operation_timeout_seconds)
    }

    async fn read_scale_set(&self) -> Result<Value, ArmError> {
        let op = self.op("read scale set", "GET", &self.scale_set_id);
        let url = self
            .arm
            .url(&self.scale_set_id, &self.settings.compute_api_version, &[]);
        self.arm.get(&op, &url).await
    }

    /// Every instance of the set with its ARM item, one paged list call.
    async fn fetch_instances(&self) -> Result<Vec<(InstanceId, Value)>, ArmError> {
        let api = &self.settings.compute_api_version;
        let items = match self.orchestration {
            Orchestration::Uniform => {
                let path = format!("{}/virtualMachines", self.scale_set_id);
                let op = self.op("list scale set instances", "GET", &path);
                let url = self.arm.url(&path, api, &[("$expand", "instanceView")]);
                self.arm.list(&op, &url).await?
            }
            Orchestration::Flexible => {
                let path = format!(
                    "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines",
                    self.settings.subscription_id, self.settings.resource_group_name
                );
                let op = self.op("list scale set virtual machines", "GET", &path);
                let filter = format!("'virtualMachineScaleSet/id' eq '{}'", self.scale_set_id);
                let url = self.arm.url(
                    &path,
                    api,
                    &[("$filter", &filter), ("$expand", "instanceView")],
                );
                let items = self.arm.list(&op, &url).await?;
                // The filter is ARM's; keep only members in case it was widened.
                items
                    .into_iter()
                    .filter(|item| {
                        item.pointer("/properties/virtualMachineScaleSet/id")
                            .and_then(Value::as_str)
                            .is_some_and(|id| id.eq_ignore_ascii_case(&self.scale_set_id))
                    })
                    .collect()
            }
        };
        Ok(items
            .into_iter()
            .filter_map(|item| {
                let id = match self.orchestration {
                    Orchestration::Uniform => item.get("instanceId"),
                    Orchestration::Flexible => item.get("name"),
                }?
                .as_str()?
                .to_string();
                Some((InstanceId(id), item))
            })
            .collect())
    }

    async fn list(&self) -> Result<Vec<ProviderInstance>, ArmError> {
        let fetched = self.fetch_instances().await?;
        let mut listed = HashMap::new();
        let mut out = Vec::with_capacity(fetched.len());
        for (id, item) in fetched {
            let state = instance_state(&item);
            out.push(ProviderInstance {
                id: id.clone(),
                state: state.clone(),
            });
            listed.insert(id, Listed { state, item });
        }
        lock(&self.addresses).retain(|id, _| listed.contains_key(id));
        *lock(&self.instances) = listed;
        Ok(out)
    }

    /// One capacity write for `count` more instances; returns how many were asked for
    /// (fewer when `max_size` caps the set).
    async fn scale_out(
        self: &Arc<Self>,
        count: usize,
    ) -> Result<(usize, Option<PendingOperation>), ArmError> {
        let api = &self.settings.compute_api_version;
        let url = self.arm.url(&self.scale_set_id, api, &[]);
        let op = self.op("change scale set capacity", "PATCH", &self.scale_set_id);
        let mut conflicts = 0;
        loop {
            let scale_set = self.read_scale_set().await?;
            let capacity = scale_set
                .pointer("/sku/capacity")
                .and_then(Value::as_u64)
                .unwrap_or(0) as usize;
            let target = (capacity + count).min(self.settings.max_size);
            if target <= capacity {
                return Ok((0, None));
            }
            let etag = scale_set.get("etag").and_then(Value::as_str);
            let body = json!({ "sku": { "capacity": target } });
            match self
                .arm
                .send(&op, Method::PATCH, &url, Some(&body), etag)
                .await
            {
                Ok(started) => {
                    tracing::info!(from = capacity, to = target, "azure: capacity raised");
                    let pending = PendingOperation {
                        op: op.clone(),
                        url: url.clone(),
                        started,
                    };
                    return Ok((target - capacity, Some(pending)));
                }
                // Someone else changed the set between our read and write: read again.
                Err(ArmError::PreconditionFailed { .. }) if conflicts < 5 => {
                    conflicts += 1;
                    tracing::info!("azure: scale set changed meanwhile, re-reading capacity");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// After a scale-out that failed inside its operation, the set's capacity may count
    /// instances that never came: bring it back to what exists, so the next increase asks
    /// for the right number.
    async fn repair_capacity(&self) -> Result<(), ArmError> {
        let _write = self.write_lock.lock().await;
        let existing = self
            .fetch_instances()
            .await?
            .iter()
            .filter(|(_, item)| instance_state(item) != InstanceState::Deleting)
            .count();
        let scale_set = self.read_scale_set().await?;
        let capacity = scale_set
            .pointer("/sku/capacity")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        if capacity <= existing {
            return Ok(());
        }
        let url = self
            .arm
            .url(&self.scale_set_id, &self.settings.compute_api_version, &[]);
        let op = self.op("repair scale set capacity", "PATCH", &self.scale_set_id);
        let body = json!({ "sku": { "capacity": existing } });
        let etag = scale_set.get("etag").and_then(Value::as_str);
        tracing::warn!(
            from = capacity,
            to = existing,
            "azure: capacity repaired after a failed scale-out"
        );
        let started = self
            .arm
            .send(&op, Method::PATCH, &url, Some(&body), etag)
            .await?;
        self.arm
            .wait_for_operation(&op, &url, started, self.operation_timeout())
            .await
    }

    /// Deletes instances in one call (`forceDeletion` for failed ones, where allowed).
    async fn delete_instances(
        &self,
        ids: &[InstanceId],
        force: bool,
    ) -> Result<Option<PendingOperation>, ArmError> {
        let path = format!("{}/delete", self.scale_set_id);
        let op = self.op("delete instances", "POST", &path);
        let mut query = Vec::new();
        if force {
            query.push(("forceDeletion", "true"));
        }
        let url = self
            .arm
            .url(&path, &self.settings.compute_api_version, &query);
        let body = json!({ "instanceIds": ids.iter().map(|id| id.0.as_str()).collect::<Vec<_>>() });
        let started = self
            .arm
            .send(&op, Method::POST, &url, Some(&body), None)
            .await?;
        if started.status == 202 {
            Ok(Some(PendingOperation { op, url, started }))
        } else {
            Ok(None)
        }
    }

    async fn addresses(
        &self,
        id: &InstanceId,
        item: &Value,
    ) -> Result<(String, Option<String>), ProviderError> {
        let want_public = self.connector.use_external_addr;
        let nics: Vec<Value> = match self.orchestration {
            Orchestration::Uniform => {
                let path = format!(
                    "{}/virtualMachines/{}/networkInterfaces",
                    self.scale_set_id, id
                );
                let op = self.op("list instance network interfaces", "GET", &path);
                let url = self.arm.url(&path, settings::VMSS_NETWORK_API_VERSION, &[]);
                self.arm.list(&op, &url).await.map_err(provider_error)?
            }
            Orchestration::Flexible => {
                let ids: Vec<&str> = item
                    .pointer("/properties/networkProfile/networkInterfaces")
                    .and_then(Value::as_array)
                    .map(|nics| {
                        nics.iter()
                            .filter_map(|nic| nic.get("id").and_then(Value::as_str))
                            .collect()
                    })
                    .unwrap_or_default();
                let mut nics = Vec::new();
                for nic_id in ids {
                    let op = self.op("read network interface", "GET", nic_id);
                    let url = self
                        .arm
                        .url(nic_id, &self.settings.network_api_version, &[]);
                    nics.push(self.arm.get(&op, &url).await.map_err(provider_error)?);
                }
                nics
            }
        };
        let Some(ip_configuration) = primary_ip_configuration(&nics) else {
            return Err(ProviderError::Instance {
                id: id.clone(),
                message: "has no network interface with an IP configuration yet".into(),
            });
        };
        let private = ip_configuration
            .pointer("/properties/privateIPAddress")
            .and_then(Value::as_str)
            .map(|address| address.split('/').next().unwrap_or(address).to_string())
            .ok_or_else(|| ProviderError::Instance {
                id: id.clone(),
                message: "has no private IP address yet".into(),
            })?;
        let public_id = ip_configuration
            .pointer("/properties/publicIPAddress/id")
            .and_then(Value::as_str);
        let public = match (want_public, public_id) {
            (false, _) => None,
            (true, None) => {
                return Err(ProviderError::Instance {
                    id: id.clone(),
                    message: "has no public IP address; set connector_config.use_external_addr = \
                              false or add a publicIPAddressConfiguration to the scale set's \
                              network profile"
                        .into(),
                });
            }
            (true, Some(public_id)) => {
                let api = if public_id
                    .to_ascii_lowercase()
                    .contains("/virtualmachinescalesets/")
                {
                    settings::VMSS_NETWORK_API_VERSION
                } else {
                    &self.settings.network_api_version
                };
                let op = self.op("read public IP address", "GET", public_id);
                let url = self.arm.url(public_id, api, &[]);
                let address = self.arm.get(&op, &url).await.map_err(provider_error)?;
                Some(
                    address
                        .pointer("/properties/ipAddress")
                        .and_then(Value::as_str)
                        .ok_or_else(|| ProviderError::Instance {
                            id: id.clone(),
                            message: format!("public IP {public_id} has no address yet"),
                        })?
                        .to_string(),
                )
            }
        };
        Ok((private, public))
    }
}

/// A started long-running operation to follow.
struct PendingOperation {
    op: Operation,
    url: String,
    started: arm::ArmResponse,
}

#[async_trait]
impl Provider for AzureProvider {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            name: "azure".into(),
            max_size: self.shared.settings.max_size,
        }
    }

    async fn list(&self) -> Result<Vec<ProviderInstance>, ProviderError> {
        self.shared.list().await.map_err(provider_error)
    }

    async fn increase(&self, count: usize) -> Result<usize, ProviderError> {
        if count == 0 {
            return Ok(0);
        }
        let (sender, receiver) = oneshot::channel();
        lock(&self.shared.increase_queue).push((count, sender));
        {
            let _write = self.shared.write_lock.lock().await;
            // Whoever holds the lock first writes for every increase queued so far; a
            // caller that finds the queue empty was served by an earlier writer.
            let batch: Vec<IncreaseWaiter> =
                std::mem::take(&mut *lock(&self.shared.increase_queue));
            if !batch.is_empty() {
                let total = batch.iter().map(|(n, _)| n).sum();
                let outcome = self.shared.scale_out(total).await;
                let mut accepted = match &outcome {
                    Ok((accepted, _)) => *accepted,
                    Err(_) => 0,
                };
                let error = outcome.as_ref().err().map(ToString::to_string);
                if let Ok((_, Some(pending))) = outcome {
                    let shared = self.shared.clone();
                    self.follow(async move {
                        let result = shared
                            .arm
                            .wait_for_operation(&pending.op, &pending.url, pending.started, shared.operation_timeout())
                            .await;
                        if let Err(e) = result {
                            tracing::error!(error = %e, "azure: scale-out failed after it was accepted");
                            lock(&shared.failed_operations).push(e.to_string());
                            if let Err(e) = shared.repair_capacity().await {
                                tracing::error!(error = %e, "azure: cannot repair the capacity");
                            }
                        }
                    });
                }
                for (asked, waiter) in batch {
                    let answer = match &error {
                        Some(error) => Err(error.clone()),
                        None => {
                            let granted = asked.min(accepted);
                            accepted -= granted;
                            Ok(granted)
                        }
                    };
                    let _ = waiter.send(answer);
                }
            }
        }
        match receiver.await {
            Ok(Ok(accepted)) => Ok(accepted),
            Ok(Err(message)) => Err(ProviderError::Platform(message)),
            Err(_) => Err(ProviderError::Platform(
                "azure: the capacity write was abandoned".into(),
            )),
        }
    }

    async fn decrease(&self, ids: &[InstanceId]) -> Result<Vec<InstanceId>, ProviderError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let _write = self.shared.write_lock.lock().await;
        let (mut failed, mut others, mut gone) = (Vec::new(), Vec::new(), Vec::new());
        {
            let instances = lock(&self.shared.instances);
            for id in ids {
                match instances.get(id).map(|listed| &listed.state) {
                    // Not in the last listing: already deleted; asking Azure would fail
                    // the whole batch on an unknown id.
                    None => gone.push(id.clone()),
                    Some(InstanceState::Failed { .. })
                        if self.shared.settings.force_delete_failed =>
                    {
                        failed.push(id.clone())
                    }
                    Some(_) => others.push(id.clone()),
                }
            }
        }
        let mut accepted = gone;
        let mut first_error = None;
        for (group, force) in [(failed, true), (others, false)] {
            if group.is_empty() {
                continue;
            }
            match self.shared.delete_instances(&group, force).await {
                Ok(pending) => {
                    if let Some(pending) = pending {
                        let shared = self.shared.clone();
                        self.follow(async move {
                            let result = shared
                                .arm
                                .wait_for_operation(
                                    &pending.op,
                                    &pending.url,
                                    pending.started,
                                    shared.operation_timeout(),
                                )
                                .await;
                            if let Err(e) = result {
                                tracing::error!(error = %e, "azure: instance deletion failed");
                                lock(&shared.failed_operations).push(e.to_string());
                            }
                        });
                    }
                    accepted.extend(group);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "azure: deletion refused");
                    first_error.get_or_insert(e);
                }
            }
        }
        match (accepted.is_empty(), first_error) {
            (true, Some(e)) => Err(provider_error(e)),
            _ => Ok(accepted),
        }
    }

    async fn connect_info(&self, id: &InstanceId) -> Result<ConnectInfo, ProviderError> {
        let cached = lock(&self.shared.addresses).get(id).cloned();
        let (internal, external) = match cached {
            Some(addresses) => addresses,
            None => {
                let mut listed = lock(&self.shared.instances).get(id).cloned();
                if listed.is_none() {
                    self.shared.list().await.map_err(provider_error)?;
                    listed = lock(&self.shared.instances).get(id).cloned();
                }
                let Some(listed) = listed else {
                    return Err(ProviderError::UnknownInstance(id.clone()));
                };
                if listed.state != InstanceState::Running {
                    return Err(ProviderError::Instance {
                        id: id.clone(),
                        message: format!("is not running yet ({:?})", listed.state),
                    });
                }
                let addresses = self.shared.addresses(id, &listed.item).await?;
                lock(&self.shared.addresses).insert(id.clone(), addresses.clone());
                addresses
            }
        };
        let connector = &self.shared.connector;
        let port = connector.protocol_port;
        Ok(ConnectInfo {
            internal_addr: format!("{internal}:{port}"),
            external_addr: external.map(|address| format!("{address}:{port}")),
            username: connector.username.clone(),
            password: connector.password.clone(),
            os: connector.os.clone(),
            arch: connector.arch.clone(),
            ..Default::default()
        })
    }

    async fn shutdown(&self) {
        for poller in lock(&self.pollers).drain(..) {
            poller.abort();
        }
    }

    async fn instance_images(&self) -> Result<Vec<InstanceImage>, ProviderError> {
        images::instance_images(&self.shared)
            .await
            .map_err(provider_error)
    }
}

/// Refuses scale sets podfleet cannot drive safely; every problem at once, each naming
/// the property and its fix.
fn check_scale_set(id: &str, scale_set: &Value) -> Result<Orchestration, ProviderError> {
    let properties = scale_set.get("properties").cloned().unwrap_or(Value::Null);
    let orchestration = match properties.get("orchestrationMode").and_then(Value::as_str) {
        Some(mode) if mode.eq_ignore_ascii_case("flexible") => Orchestration::Flexible,
        _ => Orchestration::Uniform,
    };
    let mut problems = Vec::new();
    let Some(profile) = properties.get("virtualMachineProfile") else {
        return Err(ProviderError::Config(format!(
            "scale set {id} has no virtualMachineProfile, so it cannot be scaled by capacity; \
             give it a VM profile (image, size, network)"
        )));
    };
    if orchestration == Orchestration::Uniform {
        // Azure's default for Uniform is to overprovision: extra VMs come and go under jobs.
        if properties.get("overprovision").and_then(Value::as_bool) != Some(false) {
            problems.push(
                "properties.overprovision must be false (az vmss update --set overprovision=false)"
                    .to_string(),
            );
        }
        let mode = properties
            .pointer("/upgradePolicy/mode")
            .and_then(Value::as_str)
            .unwrap_or("Manual");
        if !mode.eq_ignore_ascii_case("manual") {
            problems.push(format!(
                "properties.upgradePolicy.mode is {mode}: Azure would replace instances under \
                 running jobs; set it to Manual (podfleet rolls images out between jobs)"
            ));
        }
    } else {
        let nic_configurations = profile
            .pointer("/networkProfile/networkInterfaceConfigurations")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for nic in &nic_configurations {
            let delete = nic
                .pointer("/properties/deleteOption")
                .and_then(Value::as_str)
                .unwrap_or("Detach");
            if !delete.eq_ignore_ascii_case("delete") {
                problems.push(format!(
                    "networkInterfaceConfigurations {:?} has deleteOption {delete}: deleted \
                     instances would leave their network interfaces behind; set it to Delete",
                    nic.get("name").and_then(Value::as_str).unwrap_or("?")
                ));
            }
        }
        let os_disk = profile
            .pointer("/storageProfile/osDisk/deleteOption")
            .and_then(Value::as_str)
            .unwrap_or("Delete");
        if !os_disk.eq_ignore_ascii_case("delete") {
            problems.push(format!(
                "storageProfile.osDisk.deleteOption is {os_disk}: deleted instances would leave \
                 their disks behind; set it to Delete"
            ));
        }
    }
    if problems.is_empty() {
        Ok(orchestration)
    } else {
        Err(ProviderError::Config(format!(
            "scale set {id} is not suitable for podfleet: {}",
            problems.join("; ")
        )))
    }
}

/// Provisioning and power state of a scale-set VM or VM (with `instanceView`).
fn instance_state(item: &Value) -> InstanceState {
    let provisioning = item
        .pointer("/properties/provisioningState")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_lowercase();
    let statuses: Vec<&Value> = item
        .pointer("/properties/instanceView/statuses")
        .and_then(Value::as_array)
        .map(|statuses| statuses.iter().collect())
        .unwrap_or_default();
    fn code_of(status: &Value) -> &str {
        status.get("code").and_then(Value::as_str).unwrap_or("")
    }
    if let Some(failed) = statuses.iter().find(|status| {
        code_of(status)
            .to_ascii_lowercase()
            .starts_with("provisioningstate/failed")
    }) {
        let message = failed
            .get("message")
            .or_else(|| failed.get("displayStatus"))
            .and_then(Value::as_str)
            .unwrap_or("");
        return InstanceState::Failed {
            reason: format!("{} {message}", code_of(failed)).trim().to_string(),
        };
    }
    match provisioning.as_str() {
        "failed" => {
            return InstanceState::Failed {
                reason: "provisioningState Failed".into(),
            };
        }
        "deleting" => return InstanceState::Deleting,
        _ => {}
    }
    let power = statuses
        .iter()
        .map(|status| code_of(status))
        .find_map(|code| {
            code.strip_prefix("PowerState/")
                .or_else(|| code.strip_prefix("powerstate/"))
        })
        .map(str::to_ascii_lowercase);
    match power.as_deref() {
        Some(state @ ("deallocated" | "deallocating" | "stopped" | "stopping")) => {
            InstanceState::Failed {
                reason: format!("power state {state}: the instance will not take jobs"),
            }
        }
        Some("running") if matches!(provisioning.as_str(), "succeeded" | "updating") => {
            InstanceState::Running
        }
        _ => InstanceState::Creating,
    }
}

/// The primary IP configuration of the primary NIC (or the only ones).
fn primary_ip_configuration(nics: &[Value]) -> Option<Value> {
    let is_primary = |value: &Value| {
        value
            .pointer("/properties/primary")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    let nic = nics
        .iter()
        .find(|nic| is_primary(nic))
        .or_else(|| nics.first())?;
    let configurations = nic.pointer("/properties/ipConfigurations")?.as_array()?;
    configurations
        .iter()
        .find(|configuration| is_primary(configuration))
        .or_else(|| configurations.first())
        .cloned()
}

/// Permission and naming problems are configuration errors: no retry fixes them.
fn provider_error(error: ArmError) -> ProviderError {
    if error.is_configuration() {
        ProviderError::Config(error.to_string())
    } else {
        ProviderError::Platform(error.to_string())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(provisioning: &str, codes: &[&str]) -> Value {
        let statuses: Vec<Value> = codes.iter().map(|code| json!({ "code": code })).collect();
        json!({ "properties": { "provisioningState": provisioning, "instanceView": { "statuses": statuses } } })
    }

    #[test]
    fn states_follow_provisioning_and_power() {
        assert_eq!(
            instance_state(&item(
                "Succeeded",
                &["ProvisioningState/succeeded", "PowerState/running"]
            )),
            InstanceState::Running
        );
        assert_eq!(
            instance_state(&item("Creating", &["ProvisioningState/creating"])),
            InstanceState::Creating
        );
        assert_eq!(
            instance_state(&item("Succeeded", &["PowerState/starting"])),
            InstanceState::Creating
        );
        assert_eq!(
            instance_state(&item("Deleting", &[])),
            InstanceState::Deleting
        );
        assert!(matches!(
            instance_state(&item("Failed", &["ProvisioningState/failed/AllocationFailed", "PowerState/running"])),
            InstanceState::Failed { reason } if reason.contains("AllocationFailed")
        ));
        assert!(matches!(
            instance_state(&item("Succeeded", &["PowerState/deallocated"])),
            InstanceState::Failed { reason } if reason.contains("deallocated")
        ));
        assert!(matches!(
            instance_state(&item("Failed", &[])),
            InstanceState::Failed { .. }
        ));
    }

    #[test]
    fn the_recorded_instance_view_reads_as_running() {
        let recorded: Value = serde_json::from_str(include_str!(
            "../tests/fixtures/VirtualMachineScaleSetVMs_GetInstanceView.json"
        ))
        .unwrap();
        let item = json!({ "properties": {
            "provisioningState": "Succeeded",
            "instanceView": recorded["responses"]["200"]["body"].clone(),
        }});
        assert_eq!(instance_state(&item), InstanceState::Running);
        // The generated maximal list example carries placeholder status codes: not running.
        let recorded: Value = serde_json::from_str(include_str!(
            "../tests/fixtures/VirtualMachineScaleSetVMs_List.json"
        ))
        .unwrap();
        let item = &recorded["responses"]["200"]["body"]["value"][0];
        assert_eq!(instance_state(item), InstanceState::Creating);
    }

    #[test]
    fn the_recorded_scale_set_is_refused_with_every_reason() {
        let recorded: Value = serde_json::from_str(include_str!(
            "../tests/fixtures/VirtualMachineScaleSets_Get.json"
        ))
        .unwrap();
        let body = &recorded["responses"]["200"]["body"];
        let error = check_scale_set("/x", body).unwrap_err().to_string();
        assert!(error.contains("upgradePolicy.mode is Automatic"), "{error}");
        // Azure's default for a Uniform set is to overprovision.
        let mut overprovisioning = body.clone();
        overprovisioning["properties"]
            .as_object_mut()
            .unwrap()
            .remove("overprovision");
        let error = check_scale_set("/x", &overprovisioning)
            .unwrap_err()
            .to_string();
        assert!(error.contains("overprovision must be false"), "{error}");
        let mut fixed = body.clone();
        fixed["properties"]["upgradePolicy"]["mode"] = json!("Manual");
        assert_eq!(
            check_scale_set("/x", &fixed).unwrap(),
            Orchestration::Uniform
        );
    }

    #[test]
    fn a_flexible_set_that_would_orphan_nics_or_disks_is_refused() {
        let recorded: Value = serde_json::from_str(include_str!(
            "../tests/fixtures/VirtualMachineScaleSets_Get.json"
        ))
        .unwrap();
        let mut body = recorded["responses"]["200"]["body"].clone();
        body["properties"]["orchestrationMode"] = json!("Flexible");
        body["properties"]["virtualMachineProfile"]["storageProfile"]["osDisk"]["deleteOption"] =
            json!("Detach");
        let error = check_scale_set("/x", &body).unwrap_err().to_string();
        assert!(
            error.contains("\"myNic\" has deleteOption Detach"),
            "{error}"
        );
        assert!(error.contains("osDisk.deleteOption is Detach"), "{error}");
        // Flexible sets have no upgrade policy or overprovisioning to check.
        assert!(!error.contains("upgradePolicy"), "{error}");
        body["properties"]["virtualMachineProfile"]["storageProfile"]["osDisk"]["deleteOption"] =
            json!("Delete");
        body["properties"]["virtualMachineProfile"]["networkProfile"]["networkInterfaceConfigurations"]
            [0]["properties"]["deleteOption"] = json!("Delete");
        assert_eq!(
            check_scale_set("/x", &body).unwrap(),
            Orchestration::Flexible
        );
    }

    #[test]
    fn the_primary_address_is_taken_and_a_prefix_is_tolerated() {
        let recorded: Value =
            serde_json::from_str(include_str!("../tests/fixtures/NetworkInterfaces_Get.json"))
                .unwrap();
        let nic = recorded["responses"]["200"]["body"].clone();
        // The recorded NIC's second configuration holds a prefix (172.20.2.16/28).
        let configuration = primary_ip_configuration(std::slice::from_ref(&nic)).unwrap();
        assert_eq!(configuration["name"], "ipconfig1");
        assert_eq!(
            configuration["properties"]["privateIPAddress"],
            "172.20.2.4"
        );
        let mut reordered = nic.clone();
        reordered["properties"]["ipConfigurations"]
            .as_array_mut()
            .unwrap()
            .reverse();
        let configuration = primary_ip_configuration(&[reordered]).unwrap();
        assert_eq!(
            configuration["name"], "ipconfig1",
            "the primary one, not the first"
        );
    }
}
