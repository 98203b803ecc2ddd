//! The front door of every Tally Flight server (gateway and nodes, listening or dialed):
//! whatever a request is, its answer carries one of Tally's codes. Arrow Flight's own
//! dispatch answers requests it cannot read (an undecodable `Any`, a command it does not
//! know, a method left to its default) with its own wording, which names libraries and
//! echoes protocol details; those become `E_BAD_REQUEST` here, the original logged. A panic
//! inside any request's work, or while its answer streams, becomes `E_INTERNAL` for that
//! request alone: the connection and the process carry on. Errors gRPC answers before the
//! service sees a request (a message over the size limit, one that does not decode) are
//! typed the same way, by [`TypedGrpc`] around the whole gRPC service.

use std::panic::AssertUnwindSafe;

use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt};
use tonic::codegen::{Service, http};
use tonic::{Request, Response, Status, Streaming};

use crate::{ErrorCode, TallyError};

/// `inner` behind the front door.
#[derive(Clone)]
pub struct FrontDoor<S> {
    inner: S,
}

impl<S> FrontDoor<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        FrontDoor { inner }
    }
}

/// Where a status that is not ours arose.
#[derive(Debug, Clone, Copy)]
enum Arose {
    /// Reading or dispatching the request (Arrow Flight's or gRPC's own answer).
    Request,
    /// Sending the answer, after the request was taken.
    Answer,
}

/// A status with one of our codes: kept as it is if it has one, else a malformed request
/// (while reading it) or a fault of ours (while answering it).
fn typed(status: Status, arose: Arose) -> Status {
    if TallyError::from_status(&status).is_some() {
        return status;
    }
    tracing::info!(code = ?status.code(), detail = %status.message(), ?arose, "a status without a Tally code");
    match arose {
        Arose::Request => TallyError::new(
            ErrorCode::BadRequest,
            "the request is not a Flight SQL request Tally understands",
        ),
        Arose::Answer => TallyError::new(
            ErrorCode::Internal,
            "the answer could not be sent; the server log has the details",
        ),
    }
    .to_status()
}

fn panicked() -> Status {
    tracing::error!("a request's work panicked; that request alone failed");
    TallyError::new(
        ErrorCode::Internal,
        "the request failed inside Tally; the server log has the details",
    )
    .to_status()
}

/// Runs one request's work: its error typed, a panic inside it that request's error.
pub async fn guarded<T>(
    work: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match AssertUnwindSafe(work).catch_unwind().await {
        Ok(result) => result.map_err(|status| typed(status, Arose::Request)),
        Err(_) => Err(panicked()),
    }
}

/// A response stream whose errors are typed and whose panic ends it with `E_INTERNAL`.
fn typed_stream<T: Send + 'static>(
    stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
) -> BoxStream<'static, Result<T, Status>> {
    AssertUnwindSafe(stream)
        .catch_unwind()
        .scan(false, |ended, item| {
            let next = match (*ended, item) {
                (true, _) => None,
                (false, Ok(Ok(message))) => Some(Ok(message)),
                (false, Ok(Err(status))) => Some(Err(typed(status, Arose::Answer))),
                (false, Err(_)) => {
                    *ended = true;
                    Some(Err(panicked()))
                }
            };
            futures::future::ready(next)
        })
        .boxed()
}

/// Runs a streaming request's work and types its answer, stream included.
async fn streamed<T, St>(
    work: impl std::future::Future<Output = Result<Response<St>, Status>>,
) -> Result<Response<BoxStream<'static, Result<T, Status>>>, Status>
where
    T: Send + 'static,
    St: Stream<Item = Result<T, Status>> + Send + 'static,
{
    guarded(work)
        .await
        .map(|response| response.map(typed_stream))
}

#[tonic::async_trait]
impl<S: FlightService> FlightService for FrontDoor<S> {
    type HandshakeStream = BoxStream<'static, Result<HandshakeResponse, Status>>;
    type ListFlightsStream = BoxStream<'static, Result<FlightInfo, Status>>;
    type DoGetStream = BoxStream<'static, Result<FlightData, Status>>;
    type DoPutStream = BoxStream<'static, Result<PutResult, Status>>;
    type DoExchangeStream = BoxStream<'static, Result<FlightData, Status>>;
    type DoActionStream = BoxStream<'static, Result<arrow_flight::Result, Status>>;
    type ListActionsStream = BoxStream<'static, Result<ActionType, Status>>;

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        streamed(self.inner.handshake(request)).await
    }

    async fn list_flights(
        &self,
        request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        streamed(self.inner.list_flights(request)).await
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        guarded(self.inner.get_flight_info(request)).await
    }

    async fn poll_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        guarded(self.inner.poll_flight_info(request)).await
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        guarded(self.inner.get_schema(request)).await
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        streamed(self.inner.do_get(request)).await
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        streamed(self.inner.do_put(request)).await
    }

    async fn do_exchange(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        streamed(self.inner.do_exchange(request)).await
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        streamed(self.inner.do_action(request)).await
    }

    async fn list_actions(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        streamed(self.inner.list_actions(request)).await
    }
}

/// Requests larger than this are refused before they are read (`E_BAD_REQUEST`).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// The gRPC service of a Flight server behind its front door: the immediate errors gRPC
/// itself answers with (trailers-only responses) carry our codes too.
pub struct TypedGrpc<S> {
    inner: FlightServiceServer<FrontDoor<S>>,
}

impl<S> Clone for TypedGrpc<S> {
    fn clone(&self) -> Self {
        TypedGrpc {
            inner: self.inner.clone(),
        }
    }
}

impl<S: FlightService> TypedGrpc<S> {
    /// `service` behind its front door, taking requests of up to [`MAX_REQUEST_BYTES`].
    pub fn new(service: S) -> Self {
        TypedGrpc {
            inner: FlightServiceServer::new(FrontDoor::new(service))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        }
    }
}

impl<S> tonic::server::NamedService for TypedGrpc<S> {
    const NAME: &'static str =
        <FlightServiceServer<FrontDoor<S>> as tonic::server::NamedService>::NAME;
}

impl<S, B> Service<http::Request<B>> for TypedGrpc<S>
where
    S: FlightService,
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        <FlightServiceServer<FrontDoor<S>> as Service<http::Request<B>>>::poll_ready(
            &mut self.inner,
            cx,
        )
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let answer = <FlightServiceServer<FrontDoor<S>> as Service<http::Request<B>>>::call(
            &mut self.inner,
            request,
        );
        Box::pin(async move {
            let mut response = answer.await?;
            let headers = response.headers_mut();
            if let Some(status) = Status::from_header_map(headers)
                && status.code() != tonic::Code::Ok
            {
                let _ = typed(status, Arose::Request).add_header(headers);
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_a_requests_work_is_that_requests_typed_error() {
        let status = guarded(async {
            if std::hint::black_box(true) {
                panic!("a value from a row");
            }
            Ok(())
        })
        .await
        .unwrap_err();
        let error = TallyError::from_status(&status).expect("our format");
        assert_eq!(error.code, ErrorCode::Internal);
        assert!(!status.message().contains("a value from a row"));
        assert_eq!(guarded(async { Ok(3) }).await.unwrap(), 3);
    }

    #[tokio::test]
    async fn library_wording_becomes_a_typed_bad_request_and_ours_is_kept() {
        let library = guarded(async {
            Err::<(), _>(Status::unimplemented(
                "do_get: The defined request is invalid",
            ))
        })
        .await
        .unwrap_err();
        let error = TallyError::from_status(&library).expect("our format");
        assert_eq!(error.code, ErrorCode::BadRequest);
        assert!(!library.message().contains("defined request"));
        let ours = TallyError::new(ErrorCode::Busy, "wait").to_status();
        let kept = guarded(async { Err::<(), _>(ours.clone()) })
            .await
            .unwrap_err();
        assert_eq!(kept.message(), ours.message());
    }

    #[tokio::test]
    async fn a_panic_while_an_answer_streams_ends_it_with_a_typed_error() {
        let stream = futures::stream::iter(0..3).map(|i| {
            if i == 1 {
                panic!("mid-stream");
            }
            Ok::<_, Status>(i)
        });
        let items: Vec<_> = typed_stream(stream).collect().await;
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].as_ref().ok(), Some(&0));
        let error = TallyError::from_status(items[1].as_ref().unwrap_err()).unwrap();
        assert_eq!(error.code, ErrorCode::Internal);
    }
}
