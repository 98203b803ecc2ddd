//! The node's Flight service. It answers only release requests (a query model in a
//! `DoGet` ticket), never SQL text: each is validated against the trust's own catalogue,
//! decided by the trust's own policy for the identity, checked against the project's
//! trusts, and planned by the node itself ([`crate::release`]). The trust applies its own
//! obligations whatever the gateway asked: the National Data Opt-out whenever its policy
//! says so, and its own contribution bounds, noise ([`crate::protect`]) and budget
//! ([`crate::budget`]). Every request, refused or answered, is audited before the answer
//! is sent.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes,
    CommandGetTables, CommandStatementQuery, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{FlightDescriptor, FlightInfo, HandshakeRequest, HandshakeResponse, Ticket};

use datafusion::prelude::SessionContext;
use futures::Stream;
use serde::Serialize;
use tally_common::admission::{BudgetState, Origin, Refused, RequestIdentity, decide};
use tally_common::audit::{AuditLog, now_millis};
use tally_common::dialed::DialedPeer;
use tally_common::flight::{
    FlightDataStream, MetadataRequest, QUERY_ID_HEADER, TableInfo, encode_batches, header_text,
};
use tally_common::governance::Noise;
use tally_common::ledger::Reservation;
use tally_common::model::{ReleaseQuery, ReleaseRequest};
use tally_common::noise::Rho;
use tally_common::policy::{Decision, Policy, PolicySnapshot};
use tally_common::privacy::{ContributionBounds, ReleaseNoise};
use tally_common::queue::Slot;
use tally_common::tls::{RefusedConnection, certificate_identity};
use tally_common::{ErrorCode, TallyError};
use tonic::{Request, Response, Status, Streaming};

use crate::budget::{PrivacyState, Slot as AnswerSlot};
use crate::execution::Execution;
use crate::identity::NodeIdentity;
use crate::protect::protect;
use crate::release::{Aggregation, ReleasePlan, build_plan};

/// One line of the trust's own audit log.
#[derive(Debug, Clone, Serialize)]
pub struct NodeAuditRecord {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The gateway's query id (or `-` when the caller sent none).
    pub query_id: String,
    /// Network address of the caller.
    pub peer: String,
    /// The identity named by the caller's TLS client certificate (absent in plaintext).
    pub gateway: Option<String>,
    /// Who is asking and why, as this trust verified it (empty when it could not).
    pub identity: RequestIdentity,
    /// `connect` (a refused connection) or `release` (a release request).
    pub step: &'static str,
    /// The release received, as readable SQL (empty when none could be read).
    pub sql: String,
    /// The release received, as the model.
    pub release: Option<ReleaseQuery>,
    /// `answered`, `refused` or `failed`.
    pub outcome: &'static str,
    /// Our reason codes when refused or failed.
    pub codes: Vec<String>,
    /// The version of the trust's policy that decided (absent if it was not reached).
    pub policy_version: Option<String>,
    /// Whether the National Data Opt-out was applied.
    pub opt_out_applied: Option<bool>,
    /// The ρ this request cost the project at this trust (0 for a stored answer).
    pub rho_charged: Option<f64>,
    /// Whether the answer was the stored noisy answer of the same release.
    pub stored_answer: Option<bool>,
    /// Rows returned (groups), when answered.
    pub rows: Option<usize>,
    /// Wall time in milliseconds.
    pub duration_ms: f64,
    /// Why a connection was refused.
    pub detail: Option<String>,
}

impl NodeAuditRecord {
    /// The record of a connection refused during the TLS handshake or identity check.
    pub fn refused_connection(refused: &RefusedConnection) -> Self {
        Self::connection(
            refused.peer.to_string(),
            refused.identity.clone(),
            "connect",
            "refused",
            Some(refused.reason.clone()),
        )
    }

    /// The record of this node's connection to its gateway opening (`connected`), ending
    /// (`disconnected`), or being refused because the gateway's certificate was not one
    /// this trust accepts (`refused`, with the reason in `refusal`).
    pub fn gateway_link(peer: &DialedPeer, outcome: &'static str, refusal: Option<String>) -> Self {
        Self::connection(
            peer.addr.to_string(),
            (!peer.identity.is_empty()).then(|| peer.identity.clone()),
            "dial",
            outcome,
            refusal,
        )
    }

    /// A record about a connection rather than a request; a refusal carries its reason.
    fn connection(
        peer: String,
        gateway: Option<String>,
        step: &'static str,
        outcome: &'static str,
        refusal: Option<String>,
    ) -> Self {
        NodeAuditRecord {
            time_ms: now_millis(),
            query_id: "-".into(),
            peer,
            gateway,
            identity: RequestIdentity::default(),
            step,
            sql: String::new(),
            release: None,
            outcome,
            codes: refusal
                .iter()
                .map(|_| ErrorCode::ClientCertificate.to_string())
                .collect(),
            policy_version: None,
            opt_out_applied: None,
            rho_charged: None,
            stored_answer: None,
            rows: None,
            duration_ms: 0.0,
            detail: refusal,
        }
    }
}

/// The node's two views of its tables: everything, and without opted-out patients.
#[derive(Clone)]
pub struct Contexts {
    /// Every row.
    pub full: SessionContext,
    /// Without the rows of patients on the National Data Opt-out (absent without a list).
    pub opted_out: Option<SessionContext>,
}

/// The Flight SQL service of one trust.
#[derive(Clone)]
pub struct NodeService {
    trust: String,
    identity: Arc<NodeIdentity>,
    contexts: Contexts,
    tables: Arc<Vec<TableInfo>>,
    policy: Arc<Policy>,
    audit: Arc<AuditLog<NodeAuditRecord>>,
    execution: Arc<Execution>,
    privacy: Option<Arc<PrivacyState>>,
}

/// What one request is about, for its audit record.
struct RequestContext {
    query_id: String,
    peer: String,
    gateway: Option<String>,
    identity: RequestIdentity,
    sql: String,
    release: Option<ReleaseQuery>,
    started: Instant,
}

/// How a request ended, for its audit record.
#[derive(Default)]
struct Outcome {
    codes: Vec<String>,
    decision: Option<Decision>,
    rows: Option<usize>,
    failed: bool,
    charged: Option<f64>,
    stored: Option<bool>,
}

/// A release's answer at this trust.
struct Answer {
    batch: RecordBatch,
    charged: Rho,
    stored: bool,
}

/// Why a release was not answered: refused before anything was charged or read, or failed
/// after (a charge already reserved stays).
enum NotAnswered {
    Refused(TallyError),
    Failed(TallyError, Rho),
}

impl RequestContext {
    fn new<T>(request: &Request<T>) -> Self {
        let query_id = header_text(request.metadata(), QUERY_ID_HEADER);
        // A request on the connection this node dialed to its gateway.
        let dialed = request.extensions().get::<DialedPeer>();
        RequestContext {
            query_id: if query_id.is_empty() {
                "-".into()
            } else {
                query_id
            },
            peer: request
                .remote_addr()
                .or(dialed.map(|d| d.addr))
                .map_or_else(|| "unknown".into(), |a| a.to_string()),
            gateway: request
                .peer_certs()
                .and_then(|certs| certs.first().and_then(certificate_identity))
                .or_else(|| dialed.map(|d| d.identity.clone())),
            identity: RequestIdentity::default(),
            sql: String::new(),
            release: None,
            started: Instant::now(),
        }
    }

    fn record(&self, step: &'static str, outcome: Outcome) -> NodeAuditRecord {
        let label = match (&outcome.rows, outcome.failed) {
            (_, true) => "failed",
            (Some(_), false) => "answered",
            (None, false) if outcome.codes.is_empty() => "answered",
            (None, false) => "refused",
        };
        NodeAuditRecord {
            time_ms: now_millis(),
            query_id: self.query_id.clone(),
            peer: self.peer.clone(),
            gateway: self.gateway.clone(),
            identity: self.identity.clone(),
            step,
            sql: self.sql.clone(),
            release: self.release.clone(),
            outcome: label,
            codes: outcome.codes,
            policy_version: outcome.decision.as_ref().map(|d| d.policy_version.clone()),
            opt_out_applied: outcome
                .decision
                .as_ref()
                .map(|d| d.obligations.apply_opt_out),
            rho_charged: outcome.charged,
            stored_answer: outcome.stored,
            rows: outcome.rows,
            duration_ms: self.started.elapsed().as_secs_f64() * 1e3,
            detail: None,
        }
    }
}

impl NodeService {
    /// The service of trust `trust`, checking who asks with `identity`, over `contexts`,
    /// whose tables are listed in `tables`, deciding with `policy`, keeping its budget and
    /// stored answers in `privacy` (required by policies that add noise); queries are
    /// admitted, run and stopped by `execution`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        trust: String,
        identity: Arc<NodeIdentity>,
        contexts: Contexts,
        tables: Vec<TableInfo>,
        policy: Arc<Policy>,
        audit: Arc<AuditLog<NodeAuditRecord>>,
        execution: Arc<Execution>,
        privacy: Option<Arc<PrivacyState>>,
    ) -> Self {
        NodeService {
            trust,
            identity,
            contexts,
            tables: Arc::new(tables),
            policy,
            audit,
            execution,
            privacy,
        }
    }

    /// The context to run in: without opted-out patients whenever the decision says so.
    fn context_for(&self, decision: &Decision) -> Result<&SessionContext, TallyError> {
        if !decision.obligations.apply_opt_out {
            return Ok(&self.contexts.full);
        }
        self.contexts.opted_out.as_ref().ok_or_else(|| {
            TallyError::new(
                ErrorCode::PolicyError,
                "this query requires the National Data Opt-out, and this trust has no opt-out list configured",
            )
        })
    }

    fn metadata(&self, request: MetadataRequest) -> Result<Response<FlightDataStream>, Status> {
        Ok(Response::new(request.answer(&self.tables)?))
    }

    /// Writes a refusal's record and returns its status.
    async fn refuse(&self, context: &RequestContext, refused: Refused) -> Status {
        tracing::info!(query_id = %context.query_id, code = %refused.error.code, "refused");
        let outcome = Outcome {
            codes: refused.codes(),
            decision: refused.decision.map(|d| *d),
            ..Outcome::default()
        };
        match self.audit.write(context.record("release", outcome)).await {
            Ok(()) => refused.error.to_status(),
            Err(audit) => audit.to_status(),
        }
    }

    /// Decides, plans and runs one release request.
    async fn release(
        &self,
        mut context: RequestContext,
        metadata: tonic::metadata::MetadataMap,
        request: Result<ReleaseRequest, TallyError>,
    ) -> Result<Response<FlightDataStream>, Status> {
        match self.identity.verify(&metadata) {
            Ok(identity) => context.identity = identity,
            Err(error) => return Err(self.refuse(&context, error.into()).await),
        }
        let request = match request {
            Ok(request) => request,
            Err(error) => return Err(self.refuse(&context, error.into()).await),
        };
        let policy = self.policy.snapshot();
        context.sql = request.release.render_sql(policy.governance());
        context.release = Some(request.release.clone());
        let governance = policy.governance();
        let slot = match (governance.settings.privacy.noise, &self.privacy) {
            (Noise::Off, _) => None,
            (Noise::DiscreteGaussian, Some(state)) => {
                match state
                    .slot(&request.release, &context.identity, &policy)
                    .await
                {
                    Ok(slot) => Some(slot),
                    Err(error) => return Err(self.refuse(&context, error.into()).await),
                }
            }
            (Noise::DiscreteGaussian, None) => {
                let error = TallyError::new(
                    ErrorCode::LedgerBroken,
                    "this trust's policy adds noise but the node has no state_dir for its budget ledger",
                );
                return Err(self.refuse(&context, error.into()).await);
            }
        };
        let spent = self.privacy.as_ref().map_or(0.0, |state| {
            let dataset = &governance.settings.privacy.dataset;
            state
                .ledger
                .balance(&context.identity.project, dataset)
                .spent
                .as_f64()
        });
        let repeat = slot.as_ref().is_some_and(|slot| slot.stored.is_some());
        let budget = BudgetState {
            spent,
            paid: &|_| repeat,
        };
        let decision = match decide(
            &policy,
            &context.identity,
            Origin::Gateway,
            std::slice::from_ref(&request.release),
            &budget,
        ) {
            Ok(decision) => decision,
            Err(refused) => return Err(self.refuse(&context, refused).await),
        };
        let refuse_with = |error: TallyError, decision: &Decision| Refused {
            error,
            decision: Some(Box::new(decision.clone())),
        };
        if let Some(trusts) = &decision.obligations.trusts
            && !trusts.contains(&self.trust)
        {
            let error = TallyError::new(
                ErrorCode::Project,
                format!(
                    "project '{}' does not include trust {}",
                    context.identity.project, self.trust
                ),
            );
            return Err(self.refuse(&context, refuse_with(error, &decision)).await);
        }
        let ctx = match self.context_for(&decision) {
            Ok(ctx) => ctx.clone(),
            Err(error) => return Err(self.refuse(&context, refuse_with(error, &decision)).await),
        };
        let answer = match slot {
            None => self.exact(&ctx, &policy, &request.release, &context).await,
            Some(slot) => {
                self.protected(&ctx, &policy, &decision, &request.release, &context, slot)
                    .await
            }
        };
        match answer {
            Ok(answer) => {
                let outcome = Outcome {
                    rows: Some(answer.batch.num_rows()),
                    decision: Some(decision),
                    charged: Some(answer.charged.as_f64()),
                    stored: Some(answer.stored),
                    ..Outcome::default()
                };
                self.audit
                    .write(context.record("release", outcome))
                    .await
                    .map_err(|e| e.to_status())?;
                let schema = answer.batch.schema();
                let batches = futures::stream::iter([Ok(answer.batch)]);
                Ok(Response::new(encode_batches(schema, batches)))
            }
            Err(NotAnswered::Refused(error)) => {
                Err(self.refuse(&context, refuse_with(error, &decision)).await)
            }
            Err(NotAnswered::Failed(error, charged)) => {
                let outcome = Outcome {
                    codes: vec![error.code.to_string()],
                    decision: Some(decision),
                    failed: true,
                    charged: Some(charged.as_f64()),
                    ..Outcome::default()
                };
                Err(
                    match self.audit.write(context.record("release", outcome)).await {
                        Ok(()) => error.to_status(),
                        Err(audit) => audit.to_status(),
                    },
                )
            }
        }
    }

    /// A running slot for `release`, once its estimated cost is within the trust's ceiling:
    /// refused (`E_QUERY_COST`) when it is not, and (`E_BUSY`) when the project's or the
    /// node's queue is full or no slot frees within the query's time limit.
    async fn admit(
        &self,
        release: &ReleaseQuery,
        context: &RequestContext,
    ) -> Result<Slot, TallyError> {
        self.execution.check_cost(release)?;
        self.execution
            .admit(&context.identity.project, context.started)
            .await
    }

    /// Runs a release's plan to the end on the query runtime, within the query's time limit
    /// and processor-time budget (an answer finished after the limit is not given either).
    /// `finish` turns the plan's batches into the answer (assembling it, adding noise) on the
    /// query's worker too, within the same budgets.
    async fn run(
        &self,
        ctx: &SessionContext,
        plan: ReleasePlan,
        context: &RequestContext,
        running: Slot,
        finish: impl FnOnce(Vec<RecordBatch>) -> Result<RecordBatch, TallyError> + Send + 'static,
    ) -> Result<RecordBatch, TallyError> {
        let query = self.execution.query_context(ctx)?;
        let query_id = context.query_id.clone();
        let work = async move {
            let batches = plan
                .run(&query)
                .await
                .map_err(|err| TallyError::from_execution(err, &query_id))?;
            finish(batches)
        };
        self.execution
            .run(running, context.started, &context.query_id, work)
            .await
    }

    /// Exact aggregates, for policies without noise.
    async fn exact(
        &self,
        ctx: &SessionContext,
        policy: &PolicySnapshot,
        release: &ReleaseQuery,
        context: &RequestContext,
    ) -> Result<Answer, NotAnswered> {
        let running = self
            .admit(release, context)
            .await
            .map_err(NotAnswered::Refused)?;
        let (plan, expected) = build_plan(ctx, policy.governance(), release, &Aggregation::Exact)
            .await
            .map_err(NotAnswered::Refused)?;
        let assemble = move |batches: Vec<RecordBatch>| {
            arrow::compute::concat_batches(&expected, &batches).map_err(|_| {
                TallyError::new(ErrorCode::Internal, "the answer could not be assembled")
            })
        };
        let batch = self
            .run(ctx, plan, context, running, assemble)
            .await
            .map_err(|e| NotAnswered::Failed(e, Rho::ZERO))?;
        Ok(Answer {
            batch,
            charged: Rho::ZERO,
            stored: false,
        })
    }

    /// A release bounded per patient, noised, paid for in this trust's ledger, and stored
    /// (or the stored answer of the same release over the same data, free).
    #[allow(clippy::too_many_arguments)]
    async fn protected(
        &self,
        ctx: &SessionContext,
        policy: &PolicySnapshot,
        decision: &Decision,
        release: &ReleaseQuery,
        context: &RequestContext,
        slot: AnswerSlot,
    ) -> Result<Answer, NotAnswered> {
        let refused = NotAnswered::Refused;
        let governance = policy.governance();
        if let Some(batch) = slot.stored {
            return Ok(Answer {
                batch,
                charged: Rho::ZERO,
                stored: true,
            });
        }
        let state = self.privacy.as_ref().ok_or_else(|| {
            refused(TallyError::new(
                ErrorCode::LedgerBroken,
                "this trust's policy adds noise but the node has no state_dir for its budget ledger",
            ))
        })?;
        // A stored answer (above) needs no slot; a release computed afresh waits for one
        // before anything is charged.
        let running = self.admit(release, context).await.map_err(refused)?;
        let budget = &decision.obligations.budget;
        let rho = Rho::from_decimal(budget.rho_per_release).map_err(refused)?;
        let cap = Rho::from_decimal(budget.rho_cap).map_err(refused)?;
        let project = &context.identity.project;
        let key = slot.key;
        let bounds = ContributionBounds::of(governance, release);
        let aggregation = Aggregation::Bounded {
            bounds,
            key: state.bounding_key,
        };
        let (plan, expected) = build_plan(ctx, governance, release, &aggregation)
            .await
            .map_err(refused)?;
        let groups = release.group_by.len();
        let group_types: Vec<DataType> = expected.fields()[..groups]
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        let noise =
            ReleaseNoise::of(governance, release, bounds, rho, &group_types).map_err(refused)?;
        state
            .reserve(Reservation {
                project: project.clone(),
                dataset: budget.dataset.clone(),
                models: vec![format!("{key}/{}", uuid::Uuid::new_v4())],
                charge_each: rho,
                cap,
                cap_set_by: format!("policy {}", policy.version()),
                query_id: context.query_id.clone(),
                user: context.identity.user.clone(),
            })
            .await
            .map_err(refused)?;
        let failed = |e: TallyError| NotAnswered::Failed(e, rho);
        let add_noise =
            move |batches: Vec<RecordBatch>| protect(&noise, &expected, groups, &batches);
        let batch = self
            .run(ctx, plan, context, running, add_noise)
            .await
            .map_err(failed)?;
        state
            .answers
            .put(&key, &batch.schema(), std::slice::from_ref(&batch))
            .map_err(failed)?;
        Ok(Answer {
            batch,
            charged: rho,
            stored: false,
        })
    }

    /// Refuses SQL text: a node runs only release requests it plans itself.
    async fn refuse_sql(&self, context: RequestContext) -> Status {
        let error = TallyError::new(
            ErrorCode::BadRequest,
            "this node runs only Tally release requests (a query model), never SQL text",
        );
        self.refuse(&context, error.into()).await
    }

    /// Refuses, and audits, a request that is neither a release request nor a catalogue
    /// request (an undecodable ticket, an action, an upload, an exchange).
    pub(crate) async fn refuse_request<T>(&self, request: &Request<T>, what: &str) -> Status {
        let error = TallyError::new(
            ErrorCode::BadRequest,
            format!("{what}: this node answers only Tally release requests and catalogue requests"),
        );
        self.refuse(&RequestContext::new(request), error.into())
            .await
    }
}

#[tonic::async_trait]
impl FlightSqlService for NodeService {
    type FlightService = NodeService;

    async fn do_handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        let reply = HandshakeResponse::default();
        Ok(Response::new(Box::pin(futures::stream::once(async {
            Ok(reply)
        }))))
    }

    async fn get_flight_info_statement(
        &self,
        _query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(self.refuse_sql(RequestContext::new(&request)).await)
    }

    async fn do_get_statement(
        &self,
        _ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        Err(self.refuse_sql(RequestContext::new(&request)).await)
    }

    async fn do_get_prepared_statement(
        &self,
        _query: arrow_flight::sql::CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        Err(self.refuse_sql(RequestContext::new(&request)).await)
    }

    async fn get_flight_info_prepared_statement(
        &self,
        _query: arrow_flight::sql::CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(self.refuse_sql(RequestContext::new(&request)).await)
    }

    async fn do_get_fallback(
        &self,
        request: Request<Ticket>,
        message: arrow_flight::sql::Any,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        use futures::FutureExt;
        let context = RequestContext::new(&request);
        let on_panic = RequestContext::new(&request);
        let metadata = request.metadata().clone();
        let release = self.release(context, metadata, ReleaseRequest::from_any(&message));
        match std::panic::AssertUnwindSafe(release).catch_unwind().await {
            Ok(answer) => answer,
            Err(_) => {
                tracing::error!(query_id = %on_panic.query_id, "a release request panicked; it alone failed");
                let error = TallyError::new(
                    ErrorCode::Internal,
                    format!(
                        "the request failed at this trust; its log has the details under query id {}",
                        on_panic.query_id
                    ),
                );
                let outcome = Outcome {
                    codes: vec![error.code.to_string()],
                    failed: true,
                    ..Outcome::default()
                };
                Err(
                    match self.audit.write(on_panic.record("release", outcome)).await {
                        Ok(()) => error.to_status(),
                        Err(audit) => audit.to_status(),
                    },
                )
            }
        }
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Ok(Response::new(
            MetadataRequest::Catalogs(query).flight_info(request.into_inner())?,
        ))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Ok(Response::new(
            MetadataRequest::Schemas(query).flight_info(request.into_inner())?,
        ))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Ok(Response::new(
            MetadataRequest::Tables(query).flight_info(request.into_inner())?,
        ))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Ok(Response::new(
            MetadataRequest::TableTypes(query).flight_info(request.into_inner())?,
        ))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Ok(Response::new(
            MetadataRequest::SqlInfo(query).flight_info(request.into_inner())?,
        ))
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.metadata(MetadataRequest::Catalogs(query))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.metadata(MetadataRequest::Schemas(query))
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.metadata(MetadataRequest::Tables(query))
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.metadata(MetadataRequest::TableTypes(query))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.metadata(MetadataRequest::SqlInfo(query))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
