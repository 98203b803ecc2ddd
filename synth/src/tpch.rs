//! TPC-H `lineitem` (from the `tpchgen` generator), written as Parquet one part at a time so
//! that part `i` of `n` becomes site `i`'s table, for comparing Tally with published engines.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, Date32Builder, Decimal128Builder, Int32Builder, Int64Builder, RecordBatch,
    StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use tpchgen::generators::{LineItem, LineItemGenerator};

use crate::SynthError;
use crate::tables::{BATCH_ROWS, Columns};
use crate::writer::Table;

/// TPC-H decimals: 15 digits, 2 after the point.
const DECIMAL: DataType = DataType::Decimal128(15, 2);

/// Columns of `lineitem`, in the order and types of the TPC-H specification (decimals as
/// `DECIMAL(15,2)`, dates as `DATE`).
struct LineItemColumns {
    schema: SchemaRef,
    orderkey: Int64Builder,
    partkey: Int64Builder,
    suppkey: Int64Builder,
    linenumber: Int32Builder,
    quantity: Decimal128Builder,
    extendedprice: Decimal128Builder,
    discount: Decimal128Builder,
    tax: Decimal128Builder,
    returnflag: StringBuilder,
    linestatus: StringBuilder,
    shipdate: Date32Builder,
    commitdate: Date32Builder,
    receiptdate: Date32Builder,
    shipinstruct: StringBuilder,
    shipmode: StringBuilder,
    comment: StringBuilder,
}

impl LineItemColumns {
    fn new() -> Self {
        let field = |name: &str, data_type: DataType| Field::new(name, data_type, false);
        let decimal = || Decimal128Builder::with_capacity(BATCH_ROWS).with_data_type(DECIMAL);
        let strings = |bytes: usize| StringBuilder::with_capacity(BATCH_ROWS, BATCH_ROWS * bytes);
        Self {
            schema: Arc::new(Schema::new(vec![
                field("l_orderkey", DataType::Int64),
                field("l_partkey", DataType::Int64),
                field("l_suppkey", DataType::Int64),
                field("l_linenumber", DataType::Int32),
                field("l_quantity", DECIMAL),
                field("l_extendedprice", DECIMAL),
                field("l_discount", DECIMAL),
                field("l_tax", DECIMAL),
                field("l_returnflag", DataType::Utf8),
                field("l_linestatus", DataType::Utf8),
                field("l_shipdate", DataType::Date32),
                field("l_commitdate", DataType::Date32),
                field("l_receiptdate", DataType::Date32),
                field("l_shipinstruct", DataType::Utf8),
                field("l_shipmode", DataType::Utf8),
                field("l_comment", DataType::Utf8),
            ])),
            orderkey: Int64Builder::with_capacity(BATCH_ROWS),
            partkey: Int64Builder::with_capacity(BATCH_ROWS),
            suppkey: Int64Builder::with_capacity(BATCH_ROWS),
            linenumber: Int32Builder::with_capacity(BATCH_ROWS),
            quantity: decimal(),
            extendedprice: decimal(),
            discount: decimal(),
            tax: decimal(),
            returnflag: strings(1),
            linestatus: strings(1),
            shipdate: Date32Builder::with_capacity(BATCH_ROWS),
            commitdate: Date32Builder::with_capacity(BATCH_ROWS),
            receiptdate: Date32Builder::with_capacity(BATCH_ROWS),
            shipinstruct: strings(17),
            shipmode: strings(7),
            comment: strings(27),
        }
    }

    fn push(&mut self, item: &LineItem<'_>) {
        self.orderkey.append_value(item.l_orderkey);
        self.partkey.append_value(item.l_partkey);
        self.suppkey.append_value(item.l_suppkey);
        self.linenumber.append_value(item.l_linenumber);
        // Whole units in the generator; hundredths in the DECIMAL(15,2) column.
        self.quantity
            .append_value(i128::from(item.l_quantity) * 100);
        self.extendedprice
            .append_value(i128::from(item.l_extendedprice.into_inner()));
        self.discount
            .append_value(i128::from(item.l_discount.into_inner()));
        self.tax.append_value(i128::from(item.l_tax.into_inner()));
        self.returnflag.append_value(item.l_returnflag);
        self.linestatus.append_value(item.l_linestatus);
        self.shipdate.append_value(item.l_shipdate.to_unix_epoch());
        self.commitdate
            .append_value(item.l_commitdate.to_unix_epoch());
        self.receiptdate
            .append_value(item.l_receiptdate.to_unix_epoch());
        self.shipinstruct.append_value(item.l_shipinstruct);
        self.shipmode.append_value(item.l_shipmode);
        self.comment.append_value(item.l_comment);
    }
}

impl Columns for LineItemColumns {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn len(&self) -> usize {
        self.orderkey.len()
    }

    fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        RecordBatch::try_new(
            Arc::clone(&self.schema),
            vec![
                Arc::new(self.orderkey.finish()),
                Arc::new(self.partkey.finish()),
                Arc::new(self.suppkey.finish()),
                Arc::new(self.linenumber.finish()),
                Arc::new(self.quantity.finish()),
                Arc::new(self.extendedprice.finish()),
                Arc::new(self.discount.finish()),
                Arc::new(self.tax.finish()),
                Arc::new(self.returnflag.finish()),
                Arc::new(self.linestatus.finish()),
                Arc::new(self.shipdate.finish()),
                Arc::new(self.commitdate.finish()),
                Arc::new(self.receiptdate.finish()),
                Arc::new(self.shipinstruct.finish()),
                Arc::new(self.shipmode.finish()),
                Arc::new(self.comment.finish()),
            ],
        )
    }
}

/// Writes part `part` (1-based) of `parts` of TPC-H `lineitem` at `scale_factor` to `path`
/// (atomically, like every generated file) and returns its number of rows. The parts of one
/// scale factor together are exactly the whole table, split by order.
pub fn write_lineitem(
    path: &Path,
    scale_factor: f64,
    part: usize,
    parts: usize,
) -> Result<usize, SynthError> {
    if !(scale_factor > 0.0 && scale_factor <= 100.0) {
        return Err(SynthError::InvalidConfig(format!(
            "TPC-H scale factor {scale_factor} is outside (0, 100]"
        )));
    }
    let (Ok(part_index), Ok(part_count)) = (i32::try_from(part), i32::try_from(parts)) else {
        return Err(SynthError::InvalidConfig(format!(
            "part {part} of {parts} is too large"
        )));
    };
    if part_index < 1 || part_index > part_count {
        return Err(SynthError::InvalidConfig(format!(
            "part {part} of {parts}: parts are numbered from 1"
        )));
    }
    let mut table = Table::create(path.to_path_buf(), LineItemColumns::new(), &["l_comment"])?;
    let mut rows = 0;
    for item in LineItemGenerator::new(scale_factor, part_index, part_count).iter() {
        table.columns.push(&item);
        table.flush_if_full()?;
        rows += 1;
    }
    table.commit()?;
    Ok(rows)
}
