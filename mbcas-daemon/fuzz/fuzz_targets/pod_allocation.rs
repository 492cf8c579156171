//! PodAllocations and pods as the controller reads them from the API server:
//! any JSON is refused, or planned without a panic, and a plan never asks for
//! less than a container's request.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mbcas::k8s::{
    crd::PodAllocation,
    pods::PodFacts,
    resize::{ControllerConfig, Memory, plan},
};

fuzz_target!(|data: &[u8]| {
    // The first half (up to a NUL) is the allocation, the rest the pod.
    let (pa, pod) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let Ok(pa) = serde_json::from_slice::<PodAllocation>(pa) else {
        return;
    };
    let pod: Option<k8s_openapi::api::core::v1::Pod> = serde_json::from_slice(pod).ok();
    let facts = pod
        .as_ref()
        .map(|p| PodFacts::from_pod(p).map_err(|e| e.to_string()));
    let cfg = ControllerConfig::new("n1".to_owned());
    let wall = k8s_openapi::jiff::Timestamp::UNIX_EPOCH;
    let p = plan(
        &pa,
        facts.as_ref().map(|r| r.as_ref().map_err(Clone::clone)),
        &cfg,
        &Memory::default(),
        Duration::from_secs(100),
        wall,
    );
    if let (Some(changes), Some(Ok(f))) = (&p.resize, &facts) {
        for (name, limit) in changes {
            let c = f.containers.iter().find(|c| &c.name == name);
            assert!(
                c.is_some_and(|c| *limit >= c.request),
                "{changes:?} vs {f:?}"
            );
        }
    }
});
