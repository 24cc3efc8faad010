//! `tandem.v1.Debug`: arms failpoints in a running node, for fault tests.
//! Served only when the binary is built with the `failpoints` feature.

use tandem_proto::v1 as pb;
use tandem_proto::v1::debug_server::Debug;
use tonic::{Request, Response, Status};

pub struct DebugService;

#[tonic::async_trait]
impl Debug for DebugService {
    async fn set_failpoint(
        &self,
        request: Request<pb::SetFailpointRequest>,
    ) -> Result<Response<pb::SetFailpointResponse>, Status> {
        let request = request.into_inner();
        let result = if request.actions.is_empty() || request.actions == "off" {
            fail::remove(&request.name);
            Ok(())
        } else {
            fail::cfg(&request.name, &request.actions)
        };
        result.map_err(|e| Status::invalid_argument(format!("failpoint {}: {e}", request.name)))?;
        tracing::warn!(name = %request.name, actions = %request.actions, "failpoint set");
        Ok(Response::new(pb::SetFailpointResponse {}))
    }
}
