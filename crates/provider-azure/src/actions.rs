//! Which Azure RBAC action authorises each ARM request the provider sends. The provider
//! names the action in permission errors; a test checks every request it can issue against
//! the shipped custom role (`docs/azure-role.json`).

/// (method, path pattern, action). `*` matches one path segment; matching ignores case,
/// as ARM does. Paths are without the query string.
const TABLE: &[(&str, &str, &str)] = &[
    (
        "GET",
        "subscriptions/*/resourceGroups/*/providers/Microsoft.Compute/virtualMachineScaleSets/*",
        "Microsoft.Compute/virtualMachineScaleSets/read",
    ),
    (
        "PATCH",
        "subscriptions/*/resourceGroups/*/providers/Microsoft.Compute/virtualMachineScaleSets/*",
        "Microsoft.Compute/virtualMachineScaleSets/write",
    ),
    (
        "POST",
        "subscriptions/*/resourceGroups/*/providers/Microsoft.Compute/virtualMachineScaleSets/*/delete",
        "Microsoft.Compute/virtualMachineScaleSets/delete/action",
    ),
    (
        "GET",
        "subscriptions/*/resourceGroups/*/providers/Microsoft.Compute/virtualMachineScaleSets/*/virtualMachines",
        "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read",
    ),
    (
        "GET",
        "subscriptions/*/resourceGroups/*/providers/Microsoft.Compute/virtualMachineScaleSets/*/virtualMachines/*/networkInterfaces",
        "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/networkInterfaces/read",
    ),
    (
        "GET",
        "subscriptions/*/resourceGroups/*/providers/Microsoft.Compute/virtualMachineScaleSets/*/virtualMachines/*/networkInterfaces/*/ipConfigurations/*/publicIPAddresses/*",
        "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/networkInterfaces/ipConfigurations/publicIPAddresses/read",
    ),
    (
        "GET",
        "subscriptions/*/resourceGroups/*/providers/Microsoft.Compute/virtualMachines",
        "Microsoft.Compute/virtualMachines/read",
    ),
    (
        "GET",
        "subscriptions/*/resourceGroups/*/providers/Microsoft.Network/networkInterfaces/*",
        "Microsoft.Network/networkInterfaces/read",
    ),
    (
        "GET",
        "subscriptions/*/resourceGroups/*/providers/Microsoft.Network/publicIPAddresses/*",
        "Microsoft.Network/publicIPAddresses/read",
    ),
    (
        "GET",
        "subscriptions/*/resourceGroups/*/providers/Microsoft.Compute/galleries/*/images/*/versions",
        "Microsoft.Compute/galleries/images/versions/read",
    ),
    (
        "GET",
        "subscriptions/*/resourceGroups/*/providers/Microsoft.Compute/galleries/*/images/*/versions/*",
        "Microsoft.Compute/galleries/images/versions/read",
    ),
    (
        "GET",
        "subscriptions/*/providers/Microsoft.Compute/locations/*/operations/*",
        "Microsoft.Compute/locations/operations/read",
    ),
];

/// The RBAC action for a request, or `None` for a request podfleet never sends.
pub fn rbac_action(method: &str, path: &str) -> Option<&'static str> {
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    TABLE.iter().find_map(|(m, pattern, action)| {
        let pattern: Vec<&str> = pattern.split('/').collect();
        let matches = m.eq_ignore_ascii_case(method)
            && pattern.len() == segments.len()
            && pattern
                .iter()
                .zip(&segments)
                .all(|(p, s)| *p == "*" || p.eq_ignore_ascii_case(s));
        matches.then_some(*action)
    })
}

/// Every action the provider may need, in table order, without repeats.
pub fn all_actions() -> Vec<&'static str> {
    let mut actions: Vec<&'static str> = Vec::new();
    for (_, _, action) in TABLE {
        if !actions.contains(action) {
            actions.push(action);
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_their_actions_ignoring_case_and_query() {
        assert_eq!(
            rbac_action(
                "GET",
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/v?api-version=1"
            ),
            Some("Microsoft.Compute/virtualMachineScaleSets/read")
        );
        assert_eq!(
            rbac_action(
                "post",
                "/subscriptions/s/resourcegroups/rg/providers/microsoft.compute/virtualmachinescalesets/v/delete"
            ),
            Some("Microsoft.Compute/virtualMachineScaleSets/delete/action")
        );
        assert_eq!(
            rbac_action(
                "DELETE",
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/v"
            ),
            None,
            "deleting the whole scale set is never needed"
        );
    }
}
