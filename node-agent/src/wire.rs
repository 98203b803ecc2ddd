//! The node's Flight surface. Every call is answered by the node's own code: a `DoGet`
//! ticket is decoded here first, so a ticket that is not even a protobuf `Any` is refused
//! with our code and audited rather than left to the Flight SQL library; catalogue
//! requests (GetTables and the like) and release requests go to [`NodeService`]; actions,
//! uploads, exchanges and the rest are refused and audited.

use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::Any;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, PollInfo, SchemaResult, Ticket,
};
use futures::stream::BoxStream;
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::service::NodeService;

/// The Flight service a node serves: [`NodeService`] behind a strict front door.
#[derive(Clone)]
pub struct NodeFlight {
    inner: NodeService,
}

impl NodeFlight {
    /// The front door of `inner`.
    pub fn new(inner: NodeService) -> Self {
        NodeFlight { inner }
    }
}

type Refused<T> = Result<Response<BoxStream<'static, Result<T, Status>>>, Status>;

#[tonic::async_trait]
impl FlightService for NodeFlight {
    type HandshakeStream = <NodeService as FlightService>::HandshakeStream;
    type ListFlightsStream = BoxStream<'static, Result<FlightInfo, Status>>;
    type DoGetStream = <NodeService as FlightService>::DoGetStream;
    type DoPutStream = BoxStream<'static, Result<arrow_flight::PutResult, Status>>;
    type DoExchangeStream = BoxStream<'static, Result<FlightData, Status>>;
    type DoActionStream = BoxStream<'static, Result<arrow_flight::Result, Status>>;
    type ListActionsStream = BoxStream<'static, Result<ActionType, Status>>;

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        FlightService::handshake(&self.inner, request).await
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        FlightService::get_flight_info(&self.inner, request).await
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        if Any::decode(request.get_ref().ticket.clone()).is_err() {
            return Err(self
                .inner
                .refuse_request(&request, "an undecodable ticket")
                .await);
        }
        FlightService::do_get(&self.inner, request).await
    }

    async fn list_flights(&self, request: Request<Criteria>) -> Refused<FlightInfo> {
        Err(self.inner.refuse_request(&request, "ListFlights").await)
    }

    async fn poll_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(self.inner.refuse_request(&request, "PollFlightInfo").await)
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        Err(self.inner.refuse_request(&request, "GetSchema").await)
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Refused<arrow_flight::PutResult> {
        Err(self.inner.refuse_request(&request, "DoPut").await)
    }

    async fn do_exchange(&self, request: Request<Streaming<FlightData>>) -> Refused<FlightData> {
        Err(self.inner.refuse_request(&request, "DoExchange").await)
    }

    async fn do_action(&self, request: Request<Action>) -> Refused<arrow_flight::Result> {
        Err(self.inner.refuse_request(&request, "an action").await)
    }

    async fn list_actions(&self, request: Request<Empty>) -> Refused<ActionType> {
        Err(self.inner.refuse_request(&request, "ListActions").await)
    }
}
