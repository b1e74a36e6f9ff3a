//! The capacity planner: a pure function of the instances, the waiting jobs, the policy and
//! `now`, returning what to create and what to delete. No I/O, no clock of its own, so it
//! runs the same under a real clock, in tests and in a simulator.

use std::time::{Duration, Instant};

use podfleet_provider::InstanceId;

/// Where an instance is in its life, as the autoscaler tracks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Asked for; not yet running.
    Creating,
    /// Running; its readiness check (SSH, `instance_ready_command`, engine) is under way.
    Checking,
    /// Checked and able to take jobs.
    Ready,
    /// Draining: used up (`max_use_count`) or being replaced; takes no more jobs, deleted
    /// once empty.
    Retiring,
    /// Deletion requested.
    Deleting,
    /// Will never serve: delete it.
    Failed,
}

#[derive(Clone, Debug)]
pub struct InstanceView {
    pub id: InstanceId,
    pub phase: Phase,
    /// Slots held by running jobs.
    pub in_use: usize,
    /// Jobs ever assigned.
    pub use_count: u32,
    /// When the instance last became idle (or ready, if never used).
    pub idle_since: Instant,
}

/// The scaling rules in force now (the last matching `[[runners.autoscaler.policy]]`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    /// Idle capacity to keep, in job slots.
    pub idle_count: usize,
    pub idle_time: Duration,
    pub scale_factor: f64,
    pub scale_factor_limit: usize,
    /// Take a job only when a ready idle slot exists for it.
    pub preemptive: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    pub capacity_per_instance: usize,
    /// 0 = unlimited.
    pub max_use_count: u32,
    /// 0 = unlimited; counts instances in every phase.
    pub max_instances: usize,
    /// The platform's own cap.
    pub max_size: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Create(usize),
    Delete(Vec<InstanceId>),
}

/// Slots an instance can still hand out.
pub fn free_slots(instance: &InstanceView, limits: &Limits) -> usize {
    if instance.phase != Phase::Ready {
        return 0;
    }
    let by_capacity = limits.capacity_per_instance.saturating_sub(instance.in_use);
    if limits.max_use_count == 0 {
        return by_capacity;
    }
    by_capacity.min(limits.max_use_count.saturating_sub(instance.use_count) as usize)
}

/// Jobs a fresh instance can serve in all.
fn fresh_capacity(limits: &Limits) -> usize {
    let c = limits.capacity_per_instance.max(1);
    if limits.max_use_count == 0 {
        c
    } else {
        c.min(limits.max_use_count as usize)
    }
}

/// Idle capacity the policy asks for, given the slots in use.
pub fn idle_target(policy: &Policy, in_use: usize) -> usize {
    let by_factor = (policy.scale_factor * in_use as f64).ceil() as usize;
    let target = policy.idle_count.max(by_factor);
    if policy.scale_factor > 0.0 && policy.scale_factor_limit > 0 {
        target.min(policy.scale_factor_limit.max(policy.idle_count))
    } else {
        target
    }
}

/// Decides the next actions. `waiting` is the number of jobs waiting for a slot.
pub fn plan(
    instances: &[InstanceView],
    waiting: usize,
    policy: &Policy,
    limits: &Limits,
    now: Instant,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut delete: Vec<InstanceId> = instances
        .iter()
        // Never under a running job: a failed instance whose other slot still runs a job
        // is deleted when that job ends.
        .filter(|i| matches!(i.phase, Phase::Failed | Phase::Retiring) && i.in_use == 0)
        .map(|i| i.id.clone())
        .collect();

    let in_use: usize = instances.iter().map(|i| i.in_use).sum();
    let free: usize = instances.iter().map(|i| free_slots(i, limits)).sum();
    let per_instance = fresh_capacity(limits);
    let creating = instances
        .iter()
        .filter(|i| matches!(i.phase, Phase::Creating | Phase::Checking))
        .count();
    let coming = creating * per_instance;
    let wanted = waiting + idle_target(policy, in_use);
    let have = free + coming;

    if wanted > have {
        let counted = instances.len() - delete.len();
        let cap = match limits.max_instances {
            0 => limits.max_size,
            n => n.min(limits.max_size),
        };
        let room = cap.saturating_sub(counted);
        let needed = (wanted - have).div_ceil(per_instance);
        if needed.min(room) > 0 {
            actions.push(Action::Create(needed.min(room)));
        }
    } else {
        // Surplus idle capacity: remove idle instances past idle_time, oldest idle first.
        let mut surplus = have - wanted;
        let mut idle: Vec<&InstanceView> = instances
            .iter()
            .filter(|i| i.phase == Phase::Ready && i.in_use == 0)
            .filter(|i| now.saturating_duration_since(i.idle_since) >= policy.idle_time)
            .collect();
        idle.sort_by_key(|i| i.idle_since);
        for instance in idle {
            let slots = free_slots(instance, limits);
            if slots <= surplus {
                surplus -= slots;
                delete.push(instance.id.clone());
            }
        }
    }
    if !delete.is_empty() {
        actions.push(Action::Delete(delete));
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(c: usize, max_use: u32, max: usize) -> Limits {
        Limits {
            capacity_per_instance: c,
            max_use_count: max_use,
            max_instances: max,
            max_size: 1000,
        }
    }

    fn view(
        n: usize,
        phase: Phase,
        in_use: usize,
        use_count: u32,
        idle_for: u64,
        now: Instant,
    ) -> InstanceView {
        InstanceView {
            id: InstanceId(format!("i{n}")),
            phase,
            in_use,
            use_count,
            idle_since: now - Duration::from_secs(idle_for),
        }
    }

    #[test]
    fn burst_creates_all_instances_in_one_step() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let actions = plan(&[], 7, &Policy::default(), &limits(1, 1, 9), now);
        assert_eq!(actions, vec![Action::Create(7)]);
        let actions = plan(&[], 12, &Policy::default(), &limits(1, 1, 9), now);
        assert_eq!(
            actions,
            vec![Action::Create(9)],
            "never above max_instances"
        );
    }

    #[test]
    fn used_up_instances_are_retired_when_empty() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let instances = [
            view(1, Phase::Retiring, 0, 2, 0, now),
            view(2, Phase::Retiring, 1, 2, 0, now),
        ];
        let actions = plan(&instances, 0, &Policy::default(), &limits(1, 2, 9), now);
        assert_eq!(actions, vec![Action::Delete(vec![InstanceId("i1".into())])]);
    }

    #[test]
    fn idle_instances_go_after_idle_time_only() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let policy = Policy {
            idle_time: Duration::from_secs(60),
            ..Default::default()
        };
        let young = [view(1, Phase::Ready, 0, 1, 10, now)];
        assert!(plan(&young, 0, &policy, &limits(1, 0, 9), now).is_empty());
        let old = [view(1, Phase::Ready, 0, 1, 61, now)];
        assert_eq!(
            plan(&old, 0, &policy, &limits(1, 0, 9), now),
            vec![Action::Delete(vec![InstanceId("i1".into())])]
        );
    }

    #[test]
    fn idle_count_keeps_capacity() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let policy = Policy {
            idle_count: 2,
            ..Default::default()
        };
        assert_eq!(
            plan(&[], 0, &policy, &limits(1, 0, 9), now),
            vec![Action::Create(2)]
        );
        let two = [
            view(1, Phase::Ready, 0, 0, 999, now),
            view(2, Phase::Ready, 0, 0, 999, now),
        ];
        assert!(plan(&two, 0, &policy, &limits(1, 0, 9), now).is_empty());
    }

    fn arb_phase() -> impl Strategy<Value = Phase> {
        prop_oneof![
            Just(Phase::Creating),
            Just(Phase::Checking),
            Just(Phase::Ready),
            Just(Phase::Retiring),
            Just(Phase::Deleting),
            Just(Phase::Failed)
        ]
    }

    proptest! {
        #[test]
        fn planner_invariants(
            specs in prop::collection::vec((arb_phase(), 0usize..3, 0u32..4, 0u64..200), 0..12),
            waiting in 0usize..20,
            capacity in 1usize..3,
            max_use in 0u32..3,
            max_instances in 0usize..10,
            idle_count in 0usize..4,
        ) {
            let now = Instant::now() + Duration::from_secs(10_000);
            let l = limits(capacity, max_use, max_instances);
            let instances: Vec<InstanceView> = specs
                .iter()
                .enumerate()
                .map(|(n, (phase, in_use, uses, idle))| {
                    let in_use = if matches!(phase, Phase::Ready | Phase::Retiring | Phase::Failed) { (*in_use).min(capacity) } else { 0 };
                    view(n, *phase, in_use, *uses, *idle, now)
                })
                .collect();
            let policy = Policy { idle_count, idle_time: Duration::from_secs(100), ..Default::default() };
            let actions = plan(&instances, waiting, &policy, &l, now);
            let mut deleted = Vec::new();
            let mut created = 0;
            for action in &actions {
                match action {
                    Action::Create(n) => created += n,
                    Action::Delete(ids) => deleted.extend(ids.iter().cloned()),
                }
            }
            // Never deletes an instance with a running job.
            for id in &deleted {
                let instance = instances.iter().find(|i| &i.id == id).unwrap();
                prop_assert_eq!(instance.in_use, 0);
            }
            // Never grows past max_instances (when creating at all).
            if max_instances > 0 && created > 0 {
                prop_assert!(instances.len() - deleted.len() + created <= max_instances);
            }
            // Empty failed and retiring instances are always removed.
            for instance in &instances {
                if matches!(instance.phase, Phase::Failed | Phase::Retiring) && instance.in_use == 0 {
                    prop_assert!(deleted.contains(&instance.id));
                }
            }
        }

        /// A burst of K waiting jobs asks for all the instances they need in one action.
        #[test]
        fn a_burst_is_one_creation(
            waiting in 1usize..60,
            capacity in 1usize..4,
            max_use in 0u32..4,
            max_instances in 0usize..30,
        ) {
            let now = Instant::now() + Duration::from_secs(10_000);
            let l = limits(capacity, max_use, max_instances);
            let actions = plan(&[], waiting, &Policy::default(), &l, now);
            let per_instance = fresh_capacity(&l);
            let needed = waiting.div_ceil(per_instance);
            let expected = if max_instances == 0 { needed } else { needed.min(max_instances) };
            prop_assert_eq!(actions, vec![Action::Create(expected)]);
        }

        /// Applying the plan repeatedly reaches a fixed point where idle capacity meets the
        /// policy (when max_instances leaves room) and exceeds it by less than one instance.
        #[test]
        fn idle_capacity_converges_to_the_policy(
            busy in prop::collection::vec((1usize..3, 0u32..3), 0..6),
            idle in prop::collection::vec(0u32..3, 0..6),
            capacity in 1usize..4,
            max_use in 0u32..4,
            max_instances in 0usize..12,
            idle_count in 0usize..8,
        ) {
            let now = Instant::now() + Duration::from_secs(10_000);
            let l = limits(capacity, max_use, max_instances);
            let policy = Policy { idle_count, ..Default::default() };
            let mut next = 0;
            let mut instance = |phase, in_use: usize, uses: u32| {
                next += 1;
                let in_use = in_use.min(capacity);
                let uses = if max_use > 0 { uses.min(max_use - 1) + in_use as u32 } else { uses + in_use as u32 };
                view(next, phase, in_use, uses, 999, now)
            };
            let mut instances: Vec<InstanceView> = Vec::new();
            for (in_use, uses) in &busy {
                instances.push(instance(Phase::Ready, *in_use, *uses));
            }
            for uses in &idle {
                instances.push(instance(Phase::Ready, 0, *uses));
            }
            let mut settled = false;
            for _ in 0..6 {
                let actions = plan(&instances, 0, &policy, &l, now);
                if actions.is_empty() {
                    settled = true;
                    break;
                }
                for action in actions {
                    match action {
                        Action::Create(n) => {
                            for _ in 0..n {
                                let fresh = instance(Phase::Ready, 0, 0);
                                instances.push(InstanceView { use_count: 0, ..fresh });
                            }
                        }
                        Action::Delete(ids) => instances.retain(|i| !ids.contains(&i.id)),
                    }
                }
            }
            prop_assert!(settled, "no fixed point: {:?}", instances);
            let in_use: usize = instances.iter().map(|i| i.in_use).sum();
            let target = idle_target(&policy, in_use);
            let free: usize = instances.iter().map(|i| free_slots(i, &l)).sum();
            let room = max_instances == 0 || instances.len() < max_instances;
            if room {
                prop_assert!(free >= target, "idle {} below target {}", free, target);
            }
            let idle_left = instances.iter().any(|i| i.in_use == 0 && free_slots(i, &l) > 0);
            if idle_left {
                prop_assert!(free < target + capacity, "idle {} far above target {}", free, target);
            }
        }
    }
}
