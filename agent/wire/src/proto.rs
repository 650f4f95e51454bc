//! Generated protobuf and gRPC code, kept out of the way behind one module.

#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("patchagent.v1");
}

/// Encoded `FileDescriptorSet` of `proto/`, served by the reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/patchagent_descriptor.bin"));

/// Fully-qualified name of the agent service, as health checks and reflection know it.
pub const AGENT_SERVICE: &str = "patchagent.v1.Agent";

pub use v1::agent_client::AgentClient;
pub use v1::agent_server::{Agent, AgentServer};

/// Fully-qualified name of the controller service.
pub const CONTROLLER_SERVICE: &str = "patchagent.v1.Controller";

pub use v1::controller_client::ControllerClient;
pub use v1::controller_server::{Controller, ControllerServer};

/// Fully-qualified name of the enrolment service.
pub const ENROLLMENT_SERVICE: &str = "patchagent.v1.Enrollment";

/// The one path the controller serves to a caller without a client certificate.
pub const ENROLL_PATH: &str = "/patchagent.v1.Enrollment/Enroll";

pub use v1::enrollment_client::EnrollmentClient;
pub use v1::enrollment_server::{Enrollment, EnrollmentServer};

/// Fully-qualified name of the operator service (rollouts and relayed jobs).
pub const OPERATOR_SERVICE: &str = "patchagent.v1.Operator";

pub use v1::operator_client::OperatorClient;
pub use v1::operator_server::{Operator, OperatorServer};
