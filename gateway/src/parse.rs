//! Parsing: the analyst's SQL becomes a DataFusion logical plan, within size limits, and
//! only if it is one read-only query.

use datafusion::common::tree_node::TreeNodeRecursion;
use std::sync::Arc;

use datafusion::execution::context::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use datafusion::sql::sqlparser::dialect::{Dialect, GenericDialect, dialect_from_str};
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer, Word};

use tally_common::{ErrorCode, TallyError};

/// Longest SQL text accepted by default, in bytes.
pub const MAX_SQL_BYTES: usize = 64 * 1024;

/// Deepest logical plan accepted by default (plan nodes from root to leaf, subqueries
/// included).
pub const MAX_PLAN_DEPTH: usize = 64;

/// Most SQL tokens accepted by default (words, literals and symbols; whitespace and
/// comments are not counted).
pub const MAX_SQL_TOKENS: usize = 4_000;

/// Most operator tokens accepted by default: symbols such as `+`, `||`, `=` and `::`, and
/// operator keywords such as `AND`, `OR`, `NOT`, `LIKE` and `IN`.
pub const MAX_SQL_OPERATORS: usize = 256;

/// Most query blocks (`SELECT` or `VALUES` keywords: CTEs, subqueries, unions) accepted
/// by default.
pub const MAX_SQL_SELECTS: usize = 64;

/// Deepest nesting of brackets (`(`, `[`, `{`) accepted by default.
pub const MAX_SQL_NESTING: usize = 64;

/// Deepest nesting of calls accepted by default: brackets after a name or a keyword
/// construct (`abs(`, `CAST(`, `ARRAY[`, `EXTRACT(`), and `INTERVAL`s in a row. The SQL
/// parser retries a keyword construct that fails (`CAST(...)`, `INTERVAL ...`) another
/// way, so a failure inside such constructs nested `n` deep is parsed 2^n times: 20 took
/// 2 s, 24 `INTERVAL`s 6 s, 30 would take half an hour. At 12 the worst case parses in
/// milliseconds.
pub const MAX_SQL_CALL_NESTING: usize = 12;

/// Most tables a query may read by default, counting each use of a CTE as the tables its
/// body reads (a long join is a deep plan; a CTE used twice by a CTE used twice ... grows
/// exponentially).
pub const MAX_SQL_RELATIONS: usize = 64;

/// Size limits on one query, kept in the session's config so every planning path sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLimits {
    /// Longest SQL text accepted, in bytes.
    pub max_sql_bytes: usize,
    /// Deepest logical plan accepted.
    pub max_plan_depth: usize,
    /// Most SQL tokens accepted (see [`MAX_SQL_TOKENS`]).
    pub max_sql_tokens: usize,
    /// Most operator tokens accepted (see [`MAX_SQL_OPERATORS`]).
    pub max_sql_operators: usize,
    /// Most query blocks accepted (see [`MAX_SQL_SELECTS`]).
    pub max_sql_selects: usize,
    /// Deepest bracket nesting accepted (see [`MAX_SQL_NESTING`]).
    pub max_sql_nesting: usize,
    /// Deepest nesting of brackets after a word accepted (see [`MAX_SQL_CALL_NESTING`]).
    pub max_sql_call_nesting: usize,
    /// Most tables read, CTE uses expanded (see [`MAX_SQL_RELATIONS`]).
    pub max_sql_relations: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            max_sql_bytes: MAX_SQL_BYTES,
            max_plan_depth: MAX_PLAN_DEPTH,
            max_sql_tokens: MAX_SQL_TOKENS,
            max_sql_operators: MAX_SQL_OPERATORS,
            max_sql_selects: MAX_SQL_SELECTS,
            max_sql_nesting: MAX_SQL_NESTING,
            max_sql_call_nesting: MAX_SQL_CALL_NESTING,
            max_sql_relations: MAX_SQL_RELATIONS,
        }
    }
}

impl QueryLimits {
    /// Makes these the limits of every query planned in `ctx`.
    pub fn install(self, ctx: &SessionContext) {
        ctx.state_ref()
            .write()
            .config_mut()
            .set_extension(Arc::new(self));
    }

    /// The limits installed in `state`, or the defaults.
    pub fn of(state: &SessionState) -> Self {
        state
            .config()
            .get_extension::<QueryLimits>()
            .map_or_else(QueryLimits::default, |limits| *limits)
    }
}

/// Nodes on the longest path from `plan` to a leaf, through subqueries too.
fn plan_depth(plan: &LogicalPlan) -> usize {
    let mut deepest = plan.inputs().into_iter().map(plan_depth).max().unwrap_or(0);
    let _ = plan.apply_subqueries(|subquery| {
        deepest = deepest.max(plan_depth(subquery));
        Ok(TreeNodeRecursion::Jump)
    });
    deepest + 1
}

/// Parses and plans `sql` as a read-only query: one SELECT (or WITH ... SELECT), nothing that
/// writes, creates, copies, reads files by path, explains or changes settings.
pub async fn plan_read_only(state: &SessionState, sql: &str) -> Result<LogicalPlan, TallyError> {
    let limits = QueryLimits::of(state);
    if sql.len() > limits.max_sql_bytes {
        return Err(TallyError::new(
            ErrorCode::TooLarge,
            format!(
                "the query is {} bytes long; the limit is {}",
                sql.len(),
                limits.max_sql_bytes
            ),
        ));
    }
    let dialect = state.config().options().sql_parser.dialect;
    {
        // Scoped: the boxed dialect is not `Send`, and must not live across an await.
        let tokenizer_dialect =
            dialect_from_str(dialect).unwrap_or_else(|| Box::new(GenericDialect));
        check_tokens(sql, tokenizer_dialect.as_ref(), &limits)?;
    }
    let statement = state
        .sql_to_statement(sql, &dialect)
        .map_err(TallyError::from_planning)?;
    match &statement {
        DfStatement::Statement(inner) if matches!(inner.as_ref(), SqlStatement::Query(_)) => {}
        _ => {
            return Err(TallyError::new(
                ErrorCode::ReadOnly,
                "only read-only SELECT queries are accepted",
            ));
        }
    }
    let plan = state
        .statement_to_plan(statement)
        .await
        .map_err(TallyError::from_planning)?;
    reject_non_queries(&plan)?;
    let depth = plan_depth(&plan);
    if depth > limits.max_plan_depth {
        return Err(TallyError::new(
            ErrorCode::TooLarge,
            format!(
                "the query plan is {depth} steps deep; the limit is {}",
                limits.max_plan_depth
            ),
        ));
    }
    Ok(plan)
}

/// What the tokenizer saw of a statement: the counts [`QueryLimits`] bounds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct TokenCounts {
    /// Tokens other than whitespace and comments.
    tokens: usize,
    /// Operator symbols and keywords.
    operators: usize,
    /// `SELECT`, `VALUES` and `TABLE` keywords.
    selects: usize,
    /// Deepest bracket nesting.
    deepest: usize,
    /// Deepest nesting of brackets that follow a word.
    deepest_calls: usize,
    /// Tables read, counting each use of a CTE as the tables it reads (see [`relations`]).
    relations: u64,
}

/// Refuses, before any parsing or planning, a statement whose shape could exhaust the
/// parser's or planner's stack or time: too many tokens, operators (a flat `1+1+...` chain
/// is one deep expression tree), query blocks (thousands of CTEs), nested brackets, or
/// tables (a long join is a deep plan; a CTE used twice by a CTE used twice ... is planned
/// in time exponential in the chain). Tokenizing is linear in the text and does not
/// recurse. Text that does not tokenize is a syntax error, described by its position only.
pub fn check_tokens(
    sql: &str,
    dialect: &dyn Dialect,
    limits: &QueryLimits,
) -> Result<(), TallyError> {
    let tokens = Tokenizer::new(dialect, sql)
        .tokenize_with_location()
        .map_err(|err| {
            TallyError::new(
                ErrorCode::SqlSyntax,
                format!(
                    "the query could not be read as SQL near line {}, column {}",
                    err.location.line, err.location.column
                ),
            )
        })?;
    let significant: Vec<&Token> = tokens
        .iter()
        .map(|t| &t.token)
        .filter(|t| !matches!(t, Token::Whitespace(_) | Token::EOF))
        .collect();
    let too_large = |what: &str, found: u64, limit: usize| {
        TallyError::new(
            ErrorCode::TooLarge,
            format!("the query has {found} {what}; the limit is {limit}"),
        )
    };
    let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    // Checked first, so the other counts only ever walk a bounded number of tokens.
    if significant.len() > limits.max_sql_tokens {
        let found = as_u64(significant.len());
        return Err(too_large("tokens", found, limits.max_sql_tokens));
    }
    let counts = count_tokens(&significant);
    let checks = [
        ("operators", counts.operators, limits.max_sql_operators),
        (
            "SELECT or VALUES blocks (CTEs, subqueries, unions)",
            counts.selects,
            limits.max_sql_selects,
        ),
        (
            "levels of nested brackets",
            counts.deepest,
            limits.max_sql_nesting,
        ),
        (
            "levels of calls, casts or subqueries nested in one another",
            counts.deepest_calls,
            limits.max_sql_call_nesting,
        ),
    ];
    for (what, found, limit) in checks {
        if found > limit {
            return Err(too_large(what, as_u64(found), limit));
        }
    }
    if counts.relations > as_u64(limits.max_sql_relations) {
        return Err(too_large(
            "table reads, counting each use of a CTE as the tables it reads",
            counts.relations,
            limits.max_sql_relations,
        ));
    }
    Ok(())
}

/// Counts operators, query blocks, bracket nesting and tables of `tokens` (whitespace and
/// comments already removed).
fn count_tokens(tokens: &[&Token]) -> TokenCounts {
    let mut counts = TokenCounts {
        tokens: tokens.len(),
        ..TokenCounts::default()
    };
    // Whether each open bracket level is inside a FROM list (where a comma adds a table).
    let mut in_from = vec![false];
    // Whether each open bracket level is a call (follows a name or a keyword construct such
    // as CAST, ARRAY or EXTRACT), and how many such levels are open; `INTERVAL`s in a row
    // nest the same way without brackets.
    let mut is_call = vec![false];
    let mut calls = 0;
    let mut intervals = 0;
    // Tokens that bring a table into a query: FROM, JOIN, and commas of FROM lists.
    let mut table_slots = vec![false; tokens.len()];
    for (at, token) in tokens.iter().enumerate() {
        let interval = matches!(
            token,
            Token::Word(word) if word.quote_style.is_none() && word.keyword == Keyword::INTERVAL
        );
        intervals = if interval { intervals + 1 } else { 0 };
        counts.deepest_calls = counts.deepest_calls.max(calls + intervals);
        match token {
            Token::LParen | Token::LBracket | Token::LBrace => {
                if matches!(token, Token::LBracket) {
                    // A subscript `x[1]` wraps the expression before it.
                    counts.operators += 1;
                }
                in_from.push(false);
                counts.deepest = counts.deepest.max(in_from.len() - 1);
                let call =
                    at > 0 && matches!(tokens[at - 1], Token::Word(word) if leads_a_call(word));
                is_call.push(call);
                calls += usize::from(call);
                counts.deepest_calls = counts.deepest_calls.max(calls);
            }
            Token::RParen | Token::RBracket | Token::RBrace if in_from.len() > 1 => {
                in_from.pop();
                if is_call.pop() == Some(true) {
                    calls -= 1;
                }
            }
            Token::Comma if in_from.last().copied().unwrap_or(false) => table_slots[at] = true,
            // `a.b.c`: each period after the first of a chain is a field access.
            Token::Period => {
                let chained = at >= 2
                    && matches!(tokens[at - 1], Token::Word(_))
                    && matches!(tokens[at - 2], Token::Period);
                if chained {
                    counts.operators += 1;
                }
            }
            Token::Word(word) if word.quote_style.is_none() => {
                // Whether this keyword starts (`FROM`) or ends a FROM list at this level.
                let from_list = match word.keyword {
                    Keyword::SELECT | Keyword::VALUES | Keyword::TABLE => {
                        counts.selects += 1;
                        Some(false)
                    }
                    Keyword::FROM => {
                        table_slots[at] = true;
                        Some(true)
                    }
                    Keyword::JOIN => {
                        table_slots[at] = true;
                        None
                    }
                    keyword if ends_from_list(keyword) => Some(false),
                    keyword => {
                        if is_operator_keyword(keyword) {
                            counts.operators += 1;
                        }
                        None
                    }
                };
                if let (Some(from_list), Some(level)) = (from_list, in_from.last_mut()) {
                    *level = from_list;
                }
            }
            token if is_operator_symbol(token) => counts.operators += 1,
            _ => {}
        }
    }
    counts.relations = relations(tokens, &table_slots);
    counts
}

/// Keywords after which a comma no longer separates tables.
fn ends_from_list(keyword: Keyword) -> bool {
    matches!(
        keyword,
        Keyword::WHERE
            | Keyword::GROUP
            | Keyword::HAVING
            | Keyword::ORDER
            | Keyword::LIMIT
            | Keyword::OFFSET
            | Keyword::FETCH
            | Keyword::UNION
            | Keyword::EXCEPT
            | Keyword::INTERSECT
            | Keyword::WINDOW
            | Keyword::QUALIFY
    )
}

/// One CTE definition: its name, where the name is, and the token range of its body,
/// brackets excluded.
struct Cte {
    name: String,
    at: usize,
    body: std::ops::Range<usize>,
}

/// An upper bound on the tables a statement makes the planner read, with each use of a
/// CTE counted as the tables its body reads (DataFusion plans a CTE's body again at each
/// use). The result is the largest of the main query's count and each CTE's count.
fn relations(tokens: &[&Token], table_slots: &[bool]) -> u64 {
    let closing = matching_brackets(tokens);
    let ctes = cte_definitions(tokens, &closing);
    let mut inside_cte = vec![false; tokens.len()];
    // A definition's own name is not a use of it.
    let mut defines = vec![false; tokens.len()];
    for cte in &ctes {
        defines[cte.at] = true;
        if let Some(body) = inside_cte.get_mut(cte.body.clone()) {
            body.iter_mut().for_each(|t| *t = true);
        }
    }
    // Tables read by the tokens in `range` whose `keep` holds, CTE uses weighed by `weights`
    // (the CTEs defined so far).
    let count =
        |range: std::ops::Range<usize>, weights: &[(String, u64)], keep: &dyn Fn(usize) -> bool| {
            let mut total: u64 = 0;
            for at in range.filter(|&at| keep(at)) {
                if table_slots[at] {
                    total = total.saturating_add(1);
                }
                if let Some(name) = relation_name(tokens, at).filter(|_| !defines[at]) {
                    // The latest definition of the name wins, as in SQL scoping.
                    if let Some((_, weight)) = weights.iter().rev().find(|(n, _)| *n == name) {
                        total = total.saturating_add(*weight);
                    }
                }
            }
            total
        };
    let mut weights: Vec<(String, u64)> = Vec::with_capacity(ctes.len());
    let mut largest: u64 = 0;
    for cte in &ctes {
        let weight = count(cte.body.clone(), &weights, &|_| true);
        largest = largest.max(weight);
        weights.push((cte.name.clone(), weight));
    }
    let main = count(0..tokens.len(), &weights, &|at| !inside_cte[at]);
    largest.max(main)
}

/// For each opening bracket, the index of its closing bracket (`tokens.len()` when unclosed).
fn matching_brackets(tokens: &[&Token]) -> Vec<usize> {
    let mut closing = vec![tokens.len(); tokens.len()];
    let mut open = Vec::new();
    for (at, token) in tokens.iter().enumerate() {
        match token {
            Token::LParen | Token::LBracket | Token::LBrace => open.push(at),
            Token::RParen | Token::RBracket | Token::RBrace => {
                if let Some(start) = open.pop() {
                    closing[start] = at;
                }
            }
            _ => {}
        }
    }
    closing
}

/// The CTE definitions of a statement: `name [(columns)] AS [[NOT] MATERIALIZED] (body)`
/// after `WITH`, `RECURSIVE` or a comma.
fn cte_definitions(tokens: &[&Token], closing: &[usize]) -> Vec<Cte> {
    let is_keyword = |at: usize, keyword: Keyword| matches!(tokens.get(at), Some(Token::Word(w)) if w.quote_style.is_none() && w.keyword == keyword);
    let is_open = |at: usize| matches!(tokens.get(at), Some(Token::LParen));
    let mut ctes = Vec::new();
    for at in 1..tokens.len() {
        let Some(name) = word_name(tokens[at]) else {
            continue;
        };
        let follows_list = matches!(tokens[at - 1], Token::Comma)
            || is_keyword(at - 1, Keyword::WITH)
            || is_keyword(at - 1, Keyword::RECURSIVE);
        if !follows_list {
            continue;
        }
        let mut next = at + 1;
        if is_open(next) {
            next = closing[next].saturating_add(1);
        }
        if !is_keyword(next, Keyword::AS) {
            continue;
        }
        next += 1;
        if is_keyword(next, Keyword::NOT) {
            next += 1;
        }
        if is_keyword(next, Keyword::MATERIALIZED) {
            next += 1;
        }
        if is_open(next) {
            let end = closing[next].min(tokens.len());
            ctes.push(Cte {
                name,
                at,
                body: next + 1..end,
            });
        }
    }
    ctes
}

/// The name a word token spells, as SQL compares names: unquoted names case-insensitively.
fn word_name(token: &Token) -> Option<String> {
    match token {
        Token::Word(word) if word.quote_style.is_some() => Some(word.value.clone()),
        Token::Word(word) => Some(word.value.to_lowercase()),
        _ => None,
    }
}

/// The name at `at` when it may name a table: a word not part of a dotted name.
fn relation_name(tokens: &[&Token], at: usize) -> Option<String> {
    let dotted = |i: Option<usize>| matches!(i.and_then(|i| tokens.get(i)), Some(Token::Period));
    if dotted(at.checked_sub(1)) || dotted(Some(at + 1)) {
        return None;
    }
    word_name(tokens[at])
}

/// Keywords that combine expressions into a bigger expression.
/// Whether a bracket after `word` opens a call (a function, or a keyword construct such as
/// `CAST(`, `ARRAY[`, `EXTRACT(`), rather than grouping after an operator or a clause.
fn leads_a_call(word: &Word) -> bool {
    word.quote_style.is_some()
        || !(is_operator_keyword(word.keyword)
            || matches!(
                word.keyword,
                Keyword::WHERE
                    | Keyword::ON
                    | Keyword::HAVING
                    | Keyword::WHEN
                    | Keyword::THEN
                    | Keyword::ELSE
                    | Keyword::SELECT
                    | Keyword::AS
                    | Keyword::BY
                    | Keyword::FROM
                    | Keyword::JOIN
                    | Keyword::VALUES
            ))
}

fn is_operator_keyword(keyword: Keyword) -> bool {
    matches!(
        keyword,
        Keyword::AND
            | Keyword::OR
            | Keyword::NOT
            | Keyword::XOR
            | Keyword::IS
            | Keyword::LIKE
            | Keyword::ILIKE
            | Keyword::SIMILAR
            | Keyword::REGEXP
            | Keyword::RLIKE
            | Keyword::BETWEEN
            | Keyword::IN
            | Keyword::COLLATE
            | Keyword::AT
            | Keyword::DIV
    )
}

/// Whether a token is a value an analyst typed: a number, any kind of string literal, or a
/// placeholder. (The transparency register masks exactly these.)
pub fn is_value_token(token: &Token) -> bool {
    matches!(
        token,
        Token::Number(..)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::TripleSingleQuotedString(_)
            | Token::TripleDoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::DoubleQuotedByteStringLiteral(_)
            | Token::TripleSingleQuotedByteStringLiteral(_)
            | Token::TripleDoubleQuotedByteStringLiteral(_)
            | Token::SingleQuotedRawStringLiteral(_)
            | Token::DoubleQuotedRawStringLiteral(_)
            | Token::TripleSingleQuotedRawStringLiteral(_)
            | Token::TripleDoubleQuotedRawStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::QuoteDelimitedStringLiteral(_)
            | Token::NationalQuoteDelimitedStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_)
            | Token::Placeholder(_)
    )
}

/// Whether a symbol token is an operator. Only names, literals and punctuation are not:
/// any other token, including ones a newer tokenizer adds, counts as an operator.
fn is_operator_symbol(token: &Token) -> bool {
    !is_value_token(token)
        && !matches!(
            token,
            Token::EOF
                | Token::Word(_)
                | Token::Comma
                | Token::Whitespace(_)
                | Token::Period
                | Token::SemiColon
                | Token::LParen
                | Token::RParen
                | Token::LBracket
                | Token::RBracket
                | Token::LBrace
                | Token::RBrace
        )
}

/// Refuses plan nodes that are not part of a read-only query (defence in depth behind the
/// statement check: `SELECT ... INTO` is planned as a table creation, for instance).
fn reject_non_queries(plan: &LogicalPlan) -> Result<(), TallyError> {
    let mut refusal = None;
    plan.apply_with_subqueries(|node| {
        let bad = matches!(
            node,
            LogicalPlan::Ddl(_)
                | LogicalPlan::Dml(_)
                | LogicalPlan::Copy(_)
                | LogicalPlan::Statement(_)
                | LogicalPlan::Explain(_)
                | LogicalPlan::Analyze(_)
                | LogicalPlan::DescribeTable(_)
        );
        if bad {
            refusal = Some(TallyError::new(
                ErrorCode::ReadOnly,
                "only read-only SELECT queries are accepted",
            ));
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(|_| TallyError::new(ErrorCode::Internal, "plan inspection failed"))?;
    refusal.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `count` copies of `unit` joined by `op`, e.g. `1+1+1`.
    fn chain(unit: &str, op: &str, count: usize) -> String {
        vec![unit; count].join(op)
    }

    /// `count` CTEs, each reading the one before.
    fn ctes(count: usize) -> String {
        let mut sql = String::from("WITH c0 AS (SELECT 1 AS v)");
        for i in 1..count {
            sql.push_str(&format!(", c{i} AS (SELECT v FROM c{})", i - 1));
        }
        sql.push_str(&format!(" SELECT v FROM c{}", count - 1));
        sql
    }

    /// `count` CTEs, each reading the one before twice: its expanded plan doubles each time.
    fn doubling_ctes(count: usize) -> String {
        let mut sql = String::from("WITH c0 AS (SELECT 1 AS v)");
        for i in 1..count {
            let before = i - 1;
            sql.push_str(&format!(
                ", c{i} AS (SELECT a.v FROM c{before} a, c{before} b)"
            ));
        }
        sql.push_str(&format!(" SELECT COUNT(*) FROM c{}", count - 1));
        sql
    }

    /// A join of `count` copies of a one-row CTE, by commas or by `JOIN ... ON`.
    fn join(count: usize, commas: bool) -> String {
        let from = if commas {
            let tables: Vec<String> = (0..count).map(|i| format!("t a{i}")).collect();
            tables.join(", ")
        } else {
            (1..count).fold(String::from("t a0"), |from, i| {
                format!("{from} JOIN t a{i} ON true")
            })
        };
        format!("WITH t AS (SELECT 1 AS v) SELECT COUNT(*) FROM {from}")
    }

    /// Nested brackets `depth` deep around `1`.
    fn nested(depth: usize) -> String {
        format!("SELECT {}1{}", "(".repeat(depth), ")".repeat(depth))
    }

    fn check(sql: &str) -> Result<(), TallyError> {
        check_tokens(sql, &GenericDialect, &QueryLimits::default())
    }

    fn counts_of(sql: &str) -> TokenCounts {
        let tokens = Tokenizer::new(&GenericDialect, sql)
            .tokenize()
            .expect("tokens");
        let significant: Vec<&Token> = tokens
            .iter()
            .filter(|t| !matches!(t, Token::Whitespace(_) | Token::EOF))
            .collect();
        count_tokens(&significant)
    }

    /// Statements that overflowed the stack, took seconds, or would: all too large.
    fn hostile() -> Vec<(&'static str, String)> {
        vec![
            ("6 KB of 1+", format!("SELECT {}", chain("1", "+", 3_000))),
            (
                "6 KB of x OR",
                format!("SELECT x FROM t WHERE {}", chain("x", " OR ", 1_200)),
            ),
            (
                "6 KB of ||",
                format!("SELECT {}", chain("'a'", "||", 1_200)),
            ),
            ("unary minus", format!("SELECT {}1", "- ".repeat(2_000))),
            (
                "chained casts",
                format!("SELECT 1{}", "::INT".repeat(1_000)),
            ),
            ("2,000 CTEs", ctes(2_000)),
            ("65 CTEs", ctes(65)),
            ("65 unions", chain("SELECT 1", " UNION ALL ", 65)),
            ("nested brackets", nested(65)),
            (
                "13 CASTs failing inside",
                format!(
                    "SELECT {}1 AS ){}",
                    "CAST(".repeat(13),
                    " AS INT)".repeat(12)
                ),
            ),
            (
                "13 nested calls",
                format!("SELECT {}1{}", "abs(".repeat(13), ")".repeat(13)),
            ),
            (
                "13 INTERVALs in a row",
                format!("SELECT {}'1' DAY", "INTERVAL ".repeat(13)),
            ),
            (
                "INTERVALs inside casts",
                format!(
                    "SELECT {}{}1 AS INT){}",
                    "CAST(".repeat(6),
                    "INTERVAL ".repeat(7),
                    " AS INT)".repeat(5)
                ),
            ),
            ("4,001 tokens", format!("SELECT {}", chain("1", ",", 2_001))),
            ("1,300 tables by commas", join(1_300, true)),
            ("600 JOINs", join(600, false)),
            ("22 doubling CTEs", doubling_ctes(22)),
            ("7 doubling CTEs", doubling_ctes(7)),
        ]
    }

    #[test]
    fn hostile_statements_are_too_large() {
        for (name, sql) in hostile() {
            let err = check(&sql).expect_err(name);
            assert_eq!(err.code, ErrorCode::TooLarge, "{name}: {err}");
        }
    }

    #[test]
    fn limits_count_what_they_name() {
        let counts =
            counts_of("SELECT a, b FROM t WHERE a = 1 AND NOT (b LIKE 'x%' OR b IS NULL) -- c");
        assert_eq!(counts.tokens, 21);
        assert_eq!(counts.operators, 6, "= AND NOT LIKE OR IS");
        assert_eq!(counts.selects, 1);
        assert_eq!(counts.deepest, 1);
        assert_eq!(counts.relations, 1);
        // Quoted names are names, not keywords.
        let quoted = counts_of(r#"SELECT "select", "or" FROM t"#);
        assert_eq!((quoted.selects, quoted.operators), (1, 0));
        // FROM, a comma of the FROM list, a JOIN, another comma, and a subquery's FROM; the
        // commas of the IN list and of the select list are not tables.
        let tables = counts_of(
            "SELECT a, b FROM a, b JOIN c ON x = y, d WHERE e IN (SELECT 1 FROM f) AND g IN (1, 2)",
        );
        assert_eq!(tables.relations, 5);
        // A CTE use counts the tables its body reads.
        assert_eq!(counts_of(&ctes(10)).relations, 10);
        assert_eq!(counts_of(&doubling_ctes(6)).relations, 63);
        assert_eq!(counts_of(&doubling_ctes(7)).relations, 127);
        assert_eq!(counts_of("SELECT x[1][2] FROM t").operators, 2);
        assert_eq!(counts_of("SELECT s.a.b.c FROM t s").operators, 2);
    }

    #[test]
    fn limits_are_inclusive_and_configurable() {
        let limits = QueryLimits::default();
        let at_limit = [
            format!("SELECT {}", chain("1", "+", limits.max_sql_operators + 1)),
            // The final SELECT is a block too.
            ctes(limits.max_sql_selects - 1),
            nested(limits.max_sql_nesting),
            format!(
                "SELECT {}1{}",
                "abs(".repeat(limits.max_sql_call_nesting),
                ")".repeat(limits.max_sql_call_nesting)
            ),
            // Brackets after operators and clauses group; they are not calls.
            format!(
                "SELECT x FROM t WHERE {}x = 1{}",
                "x = 1 AND (".repeat(20),
                ")".repeat(20)
            ),
            join(limits.max_sql_relations, true),
            doubling_ctes(6),
        ];
        for sql in &at_limit {
            assert_eq!(check(sql), Ok(()), "{sql}");
        }
        let tight = QueryLimits {
            max_sql_operators: 1,
            ..QueryLimits::default()
        };
        let err = check_tokens("SELECT 1 + 2 + 3", &GenericDialect, &tight).expect_err("refused");
        assert_eq!(err.code, ErrorCode::TooLarge);
        assert_eq!(err.message, "the query has 2 operators; the limit is 1");
    }

    #[test]
    fn text_that_does_not_tokenize_is_a_syntax_error_with_a_position() {
        let err = check("SELECT 1,\n 'unterminated").expect_err("refused");
        assert_eq!(err.code, ErrorCode::SqlSyntax);
        assert_eq!(
            err.message,
            "the query could not be read as SQL near line 2, column 2"
        );
    }

    /// A selection of the equivalence suite's queries (tests/equivalence.rs), and others.
    #[test]
    fn ordinary_queries_pass() {
        let queries = [
            "SELECT COUNT(*) FROM episodes",
            "SELECT trust_code, admission_method, specialty, COUNT(*), AVG(cost), MAX(length_of_stay) \
             FROM episodes GROUP BY 1, 2, 3",
            "SELECT specialty, SUM(cost * (1 - length_of_stay)), AVG(cost * 2 + length_of_stay), \
             STDDEV(cost - length_of_stay) FROM episodes GROUP BY specialty",
            "SELECT date_trunc('month', admission_date) AS month, COUNT(*) AS admissions FROM episodes \
             WHERE admission_method IN ('21', '22', '23', '24', '28') GROUP BY date_trunc('month', admission_date)",
            "SELECT p.ethnicity, e.trust_code, COUNT(*) FROM episodes e JOIN patients p ON e.person_id = p.person_id \
             WHERE p.imd_decile <= 3 AND e.admission_method = '21' GROUP BY p.ethnicity, e.trust_code",
            "SELECT c.chapter, c.title, COUNT(*) AS episodes, SUM(e.cost) AS cost FROM episodes e \
             JOIN icd10_chapters c ON substr(e.diagnosis_icd10, 1, 3) BETWEEN c.code_from AND c.code_to \
             GROUP BY c.chapter, c.title",
            "SELECT specialty, COUNT(*) FROM episodes GROUP BY specialty \
             HAVING COUNT(*) > (SELECT COUNT(*) FROM episodes) / 20",
            "SELECT COUNT(*) FROM episodes WHERE person_id IN (SELECT person_id FROM patients WHERE sex = 'F')",
            "WITH a AS (SELECT COUNT(*) AS n FROM episodes), b AS (SELECT COUNT(*) AS m FROM patients) \
             SELECT n, m, CAST(n AS DOUBLE) / m AS per_patient FROM a CROSS JOIN b",
            "SELECT 'episodes' AS what, COUNT(*) AS n FROM episodes UNION ALL SELECT 'patients', COUNT(*) FROM patients",
            "SELECT specialty, COUNT(*) AS n, RANK() OVER (ORDER BY COUNT(*) DESC) AS busiest FROM episodes \
             GROUP BY specialty",
            "SELECT age_band(age_at_admission), COUNT(*) FROM episodes WHERE admission_date >= DATE '2022-01-01' \
             AND diagnosis_icd10 LIKE 'F50%' AND procedure_opcs4 IS NOT NULL GROUP BY 1",
        ];
        for sql in queries {
            assert_eq!(check(sql), Ok(()), "{sql}");
        }
        let cte_join = counts_of(queries[8]);
        assert_eq!(
            cte_join.relations, 4,
            "FROM a, JOIN b, and one table in each"
        );
    }

    /// Runs `work` on a thread with the stack of the gateway's workers and its own
    /// runtime, so that a stack overflow would abort the test run.
    fn on_worker_stack<T: Send + 'static>(
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        std::thread::Builder::new()
            .stack_size(tally_common::session::WORKER_STACK_BYTES)
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime")
                    .block_on(work)
            })
            .expect("thread")
            .join()
            .expect("no panic")
    }

    /// Through the real planning path: hostile statements are refused before the parser,
    /// and statements at the limits parse, plan and optimise on a worker's stack.
    #[test]
    fn planning_refuses_hostile_statements_and_survives_the_limits() {
        on_worker_stack(async {
            let ctx = tally_common::session::new_context().expect("context");
            // The plan depth limit would refuse the long joins after planning; lifted here
            // to show that the token limits alone keep planning within the stack.
            QueryLimits {
                max_plan_depth: usize::MAX,
                ..QueryLimits::default()
            }
            .install(&ctx);
            let state = ctx.state();
            for (name, sql) in hostile() {
                let err = plan_read_only(&state, &sql).await.expect_err(name);
                assert_eq!(err.code, ErrorCode::TooLarge, "{name}: {err}");
            }
            let err = plan_read_only(&state, "SELECT 'open")
                .await
                .expect_err("refused");
            assert_eq!(err.code, ErrorCode::SqlSyntax);
            let operators = MAX_SQL_OPERATORS + 1;
            let at_limit = [
                format!("SELECT {}", chain("1", "+", operators)),
                format!("SELECT {}", chain("'a'", "||", operators)),
                format!(
                    "SELECT x FROM (VALUES (true)) AS t(x) WHERE {}",
                    chain("x", " OR ", operators - 1)
                ),
                join(MAX_SQL_RELATIONS, true),
                join(MAX_SQL_RELATIONS, false),
                doubling_ctes(6),
            ];
            for sql in at_limit {
                let plan = plan_read_only(&state, &sql).await.expect("planned");
                let optimised = state.optimize(&plan).expect("optimised");
                state
                    .create_physical_plan(&optimised)
                    .await
                    .expect("physical plan");
            }
        });
    }
}
