//! Which image each instance runs, against the scale set's model and, optionally, the
//! newest usable version of the model's Compute Gallery image definition.

use podfleet_provider::InstanceImage;
use serde_json::Value;

use crate::arm::ArmError;
use crate::{Orchestration, Shared};

/// An image reference: a gallery (or managed image) id, or a marketplace image.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ImageReference {
    /// How to show it.
    display: String,
    /// Gallery id without `/versions/...`, lower case, for comparison.
    definition: Option<String>,
    version: Option<String>,
}

fn image_reference(value: Option<&Value>) -> Option<ImageReference> {
    let value = value?;
    let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_string);
    if let Some(id) = text("id")
        .or_else(|| text("sharedGalleryImageId"))
        .or_else(|| text("communityGalleryImageId"))
    {
        let lower = id.to_ascii_lowercase();
        let (definition, version) = match lower.find("/versions/") {
            Some(at) => (
                lower[..at].to_string(),
                Some(id[at + "/versions/".len()..].to_string()),
            ),
            None => (lower, None),
        };
        return Some(ImageReference {
            display: id,
            definition: Some(definition),
            version,
        });
    }
    let version = text("exactVersion").or_else(|| text("version"));
    Some(ImageReference {
        display: format!(
            "{}:{}:{}:{}",
            text("publisher").unwrap_or_default(),
            text("offer").unwrap_or_default(),
            text("sku").unwrap_or_default(),
            version.clone().unwrap_or_default()
        ),
        definition: None,
        version,
    })
}

pub(crate) async fn instance_images(shared: &Shared) -> Result<Vec<InstanceImage>, ArmError> {
    let scale_set = shared.read_scale_set().await?;
    let model = image_reference(
        scale_set.pointer("/properties/virtualMachineProfile/storageProfile/imageReference"),
    );
    let mut target_version = model
        .as_ref()
        .and_then(|m| m.version.clone())
        .filter(|v| v != "latest");
    if shared.settings.track_gallery_latest
        && let Some(definition) = model
            .as_ref()
            .and_then(|m| m.definition.as_ref())
            .filter(|d| d.contains("/providers/microsoft.compute/galleries/"))
    {
        // The definition part of the model's id, with the id's own casing.
        let display = &model.as_ref().expect("definition implies a model").display;
        let path = &display[..definition.len()];
        if let Some(latest) = latest_gallery_version(shared, path).await? {
            target_version = Some(latest);
        }
    }
    let instances = shared.fetch_instances().await?;
    Ok(instances
        .into_iter()
        .map(|(id, item)| {
            let image = image_reference(item.pointer("/properties/storageProfile/imageReference"));
            let latest_model_applied = match shared.orchestration {
                Orchestration::Uniform => item
                    .pointer("/properties/latestModelApplied")
                    .and_then(Value::as_bool),
                Orchestration::Flexible => None,
            };
            let version = image.as_ref().and_then(|i| i.version.clone());
            let up_to_date = if latest_model_applied == Some(false) {
                Some(false)
            } else if let (Some(version), Some(target)) = (&version, &target_version) {
                Some(version == target)
            } else if shared.orchestration == Orchestration::Flexible {
                // Flexible VMs have no latestModelApplied: compare with the model.
                match (&image, &model) {
                    (Some(image), Some(model)) => {
                        Some(image.display.eq_ignore_ascii_case(&model.display))
                    }
                    _ => None,
                }
            } else {
                latest_model_applied
            };
            InstanceImage {
                id,
                image: image.map(|i| i.display).unwrap_or_default(),
                version,
                latest_model_applied,
                target_version: target_version.clone(),
                up_to_date,
            }
        })
        .collect())
}

/// The newest version Azure would pick for "latest" in the scale set's region, and stricter:
/// succeeded, not excluded, replicated to the region, not past end of life, not flagged.
async fn latest_gallery_version(
    shared: &Shared,
    definition: &str,
) -> Result<Option<String>, ArmError> {
    let path = format!("{definition}/versions");
    let op = shared.op("list gallery image versions", "GET", &path);
    let url = shared
        .arm
        .url(&path, &shared.settings.gallery_api_version, &[]);
    let versions = shared.arm.list(&op, &url).await?;
    // Newest first; the first one fully replicated to the scale set's region wins, so a
    // version still copying is not rolled out (new instances could not be built from it).
    for candidate in usable_versions(&versions, &shared.location, chrono::Utc::now())
        .into_iter()
        .take(3)
    {
        let path = format!("{definition}/versions/{candidate}");
        let op = shared.op("read gallery image version", "GET", &path);
        let url = shared.arm.url(
            &path,
            &shared.settings.gallery_api_version,
            &[("$expand", "ReplicationStatus")],
        );
        let version = shared.arm.get(&op, &url).await?;
        if replicated_to(&version, &shared.location) {
            return Ok(Some(candidate));
        }
        tracing::info!(version = %candidate, region = %shared.location, "azure: gallery version not yet replicated here");
    }
    Ok(None)
}

fn region_key(name: &str) -> String {
    name.replace(' ', "").to_ascii_lowercase()
}

/// `properties.replicationStatus.summary[]` says `Completed` for `location`.
fn replicated_to(version: &Value, location: &str) -> bool {
    let here = region_key(location);
    version
        .pointer("/properties/replicationStatus/summary")
        .and_then(Value::as_array)
        .is_some_and(|summary| {
            summary.iter().any(|entry| {
                entry["region"]
                    .as_str()
                    .is_some_and(|r| region_key(r) == here)
                    && entry["state"]
                        .as_str()
                        .is_some_and(|state| state.eq_ignore_ascii_case("completed"))
            })
        })
}

/// The newest usable version, without the replication check (see [`usable_versions`]).
#[cfg(test)]
fn select_latest(
    versions: &[Value],
    location: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<String> {
    usable_versions(versions, location, now).into_iter().next()
}

/// Versions Azure would consider for "latest" in `location`, and stricter: succeeded, not
/// excluded, targeting the region, not past end of life, not flagged; newest first.
fn usable_versions(
    versions: &[Value],
    location: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<String> {
    let region = region_key;
    let here = region(location);
    let mut usable: Vec<(Vec<u64>, String)> = versions
        .iter()
        .filter(|version| {
            let properties = &version["properties"];
            let publishing = &properties["publishingProfile"];
            let succeeded = properties["provisioningState"]
                .as_str()
                .is_none_or(|state| state.eq_ignore_ascii_case("succeeded"));
            let excluded = publishing["excludeFromLatest"].as_bool().unwrap_or(false);
            let in_region = publishing["targetRegions"]
                .as_array()
                .is_some_and(|targets| {
                    targets.iter().any(|target| {
                        target["name"]
                            .as_str()
                            .is_some_and(|name| region(name) == here)
                            && !target["excludeFromLatest"].as_bool().unwrap_or(false)
                    })
                });
            let ended = publishing["endOfLifeDate"]
                .as_str()
                .and_then(|date| chrono::DateTime::parse_from_rfc3339(date).ok())
                .is_some_and(|end| end < now);
            let flagged = properties["safetyProfile"]["reportedForPolicyViolation"]
                .as_bool()
                .unwrap_or(false);
            succeeded && !excluded && in_region && !ended && !flagged
        })
        .filter_map(|version| {
            let name = version["name"]
                .as_str()
                .or_else(|| version["id"].as_str().and_then(|id| id.rsplit('/').next()))?;
            let parts: Vec<u64> = name
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            Some((parts, name.to_string()))
        })
        .collect();
    usable.sort();
    usable.into_iter().rev().map(|(_, name)| name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn version(name: &str, regions: &[&str]) -> Value {
        let targets: Vec<Value> = regions.iter().map(|r| json!({ "name": r })).collect();
        json!({ "name": name, "properties": { "provisioningState": "Succeeded", "publishingProfile": { "targetRegions": targets } } })
    }

    #[test]
    fn versions_compare_as_numbers_and_unusable_ones_are_skipped() {
        let now = chrono::Utc::now();
        let mut excluded = version("3.0.0", &["West US"]);
        excluded["properties"]["publishingProfile"]["excludeFromLatest"] = json!(true);
        let mut ended = version("2.0.0", &["West US"]);
        ended["properties"]["publishingProfile"]["endOfLifeDate"] = json!("2000-01-01T00:00:00Z");
        let versions = [
            version("1.9.9", &["West US"]),
            version("1.10.0", &["West US"]),
            version("9.0.0", &["East US"]),
            excluded,
            ended,
        ];
        assert_eq!(
            select_latest(&versions, "westus", now).as_deref(),
            Some("1.10.0")
        );
    }

    #[test]
    fn the_recorded_gallery_listing_is_read() {
        let recorded: Value = serde_json::from_str(include_str!(
            "../tests/fixtures/GalleryImageVersions_ListByGalleryImage.json"
        ))
        .unwrap();
        let versions = recorded["responses"]["200"]["body"]["value"]
            .as_array()
            .unwrap();
        // The recorded version is flagged for a policy violation: it must not be chosen.
        assert_eq!(select_latest(versions, "westus", chrono::Utc::now()), None);
        let mut unflagged = versions.clone();
        for v in &mut unflagged {
            v["properties"]["safetyProfile"]["reportedForPolicyViolation"] = json!(false);
        }
        assert_eq!(
            select_latest(&unflagged, "westus", chrono::Utc::now()).as_deref(),
            Some("1.0.0")
        );
    }

    #[test]
    fn the_recorded_replication_status_is_read_per_region() {
        let recorded: Value = serde_json::from_str(include_str!(
            "../tests/fixtures/GalleryImageVersions_Get.WithReplicationStatus.json"
        ))
        .unwrap();
        let mut version = recorded["responses"]["200"]["body"].clone();
        assert!(replicated_to(&version, "westus"));
        assert!(replicated_to(&version, "East US"));
        assert!(!replicated_to(&version, "northeurope"));
        version["properties"]["replicationStatus"]["summary"][0]["state"] = json!("Replicating");
        assert!(!replicated_to(&version, "westus"));
    }

    #[test]
    fn gallery_and_marketplace_references_are_told_apart() {
        let gallery = image_reference(Some(&json!({
            "id": "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/galleries/G/images/podman/versions/1.2.3"
        })))
        .unwrap();
        assert_eq!(gallery.version.as_deref(), Some("1.2.3"));
        assert!(gallery.definition.unwrap().ends_with("/images/podman"));
        let marketplace = image_reference(Some(&json!({
            "publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server", "version": "latest", "exactVersion": "24.04.202501010"
        })))
        .unwrap();
        assert_eq!(marketplace.version.as_deref(), Some("24.04.202501010"));
    }
}
