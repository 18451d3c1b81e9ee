"""A repository with planted needles, for retrieval's recall: the test and ``bench/bench_retrieval.py``.

Thirty needle functions, each with a unique name, each defined only in its own module that no
other module imports (so a window-sized message 1 leaves it out), among generated filler
modules of the same shape and vocabulary (their paths are longer than the filler's, so a fit that
takes files by priority takes them last). For each needle there is a question that names it
and one that describes what it does without naming it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Needle:
    name: str
    doc: str  # its docstring: what it does
    described: str  # a question about it that does not name it

    @property
    def path(self) -> str:
        """A name that does not give the function away, longer than any filler module's (so ranked after)."""
        return f"src/shop/operations/batch_{NEEDLES.index(self):02d}_helpers.py"

    @property
    def named(self) -> str:
        return f"What does `{self.name}` do, and what does it return when its input is empty?"


NEEDLES = [
    Needle("compute_parcel_surcharge", "Add the courier's surcharge for parcels heavier than the weight limit.",
           "Which code adds the courier surcharge when a parcel is heavier than the weight limit?"),
    Needle("rotate_signing_keyring", "Replace the oldest signing key in the keyring and keep the two newest.",
           "How is the oldest signing key replaced in the keyring?"),
    Needle("throttle_webhook_bursts", "Drop webhook deliveries that arrive faster than the burst allowance.",
           "Where are webhook deliveries dropped when they come in a burst above the allowance?"),
    Needle("merge_duplicate_invoices", "Merge invoices that share a customer and a billing period.",
           "What merges duplicate invoices of one customer in the same billing period?"),
    Needle("quarantine_corrupt_thumbnails", "Move thumbnails whose checksum does not match into quarantine.",
           "Which function moves corrupt thumbnails with a bad checksum into quarantine?"),
    Needle("estimate_pallet_stacking", "Estimate how many pallets stack in a truck bay of a given height.",
           "How do we estimate how many pallets can be stacked in a truck bay?"),
    Needle("reconcile_ledger_drift", "Find ledger entries whose balance drifted from the bank statement.",
           "Where do we find ledger entries that drifted from the bank statement balance?"),
    Needle("decay_loyalty_points", "Expire loyalty points older than the retention window, oldest first.",
           "How are old loyalty points expired after the retention window?"),
    Needle("sanitize_coupon_codes", "Uppercase coupon codes and strip characters that look alike.",
           "What cleans up coupon codes, making them uppercase and removing look-alike characters?"),
    Needle("schedule_warehouse_picking", "Order picking tasks so each aisle of the warehouse is walked once.",
           "Which code orders the warehouse picking tasks so every aisle is walked only once?"),
    Needle("blend_exchange_rates", "Average the exchange rates of three providers, ignoring the outlier.",
           "How are exchange rates from several providers averaged while ignoring an outlier?"),
    Needle("forecast_refund_volume", "Forecast next week's refund volume from the last eight weeks.",
           "Where is next week's refund volume forecast from recent weeks?"),
    Needle("verify_courier_manifest", "Check that every parcel on the courier manifest was scanned at the dock.",
           "What checks that each parcel on a courier manifest was scanned at the dock?"),
    Needle("prune_abandoned_carts", "Delete carts untouched for thirty days unless they hold a gift card.",
           "Which function deletes abandoned carts after thirty days but keeps those with a gift card?"),
    Needle("allocate_gift_wrapping", "Assign gift wrapping stations to orders by ribbon colour.",
           "How are gift wrapping stations assigned to orders by ribbon colour?"),
    Needle("detect_chargeback_fraud", "Flag chargebacks from cards that disputed more than twice this month.",
           "What flags chargeback fraud for cards that disputed several times this month?"),
    Needle("compress_audit_trail", "Compress audit trail segments older than a day into gzip archives.",
           "Where are old audit trail segments compressed into archives?"),
    Needle("calibrate_scale_drift", "Correct a shipping scale's reading by its last calibration offset.",
           "How is a shipping scale reading corrected by its calibration offset?"),
    Needle("split_backorder_lines", "Split order lines into shipped and backordered quantities.",
           "What splits an order line into the shipped part and the backordered part?"),
    Needle("render_packing_slip", "Render the packing slip as plain text with one line per item.",
           "Which code renders a packing slip as plain text, one line per item?"),
    Needle("negotiate_freight_quote", "Ask three freight carriers for a quote and keep the cheapest one.",
           "How do we pick the cheapest quote from the freight carriers?"),
    Needle("hydrate_product_catalog", "Fill missing product fields in the catalog from the supplier feed.",
           "Where are missing product catalog fields filled from the supplier feed?"),
    Needle("tally_returned_items", "Count returned items per reason code for the monthly returns report.",
           "What counts returned items per reason code for the monthly returns report?"),
    Needle("expire_session_tokens", "Revoke session tokens idle for longer than the idle timeout.",
           "How are idle session tokens revoked after the idle timeout?"),
    Needle("rebalance_inventory_bins", "Move stock between bins so no bin is fuller than ninety percent.",
           "Which code moves stock between inventory bins so none is more than ninety percent full?"),
    Needle("archive_stale_tickets", "Close support tickets with no reply for two weeks and archive them.",
           "Where are support tickets closed and archived after two weeks without a reply?"),
    Needle("convert_metric_dimensions", "Convert parcel dimensions from inches to centimetres, rounding up.",
           "What converts parcel dimensions from inches to centimetres?"),
    Needle("score_supplier_reliability", "Score suppliers by their late deliveries and damaged shipments.",
           "How are suppliers scored on late deliveries and damaged shipments?"),
    Needle("queue_restock_alerts", "Queue an alert when a product's stock falls below its reorder point.",
           "Which function raises an alert when stock falls below the reorder point?"),
    Needle("batch_label_printing", "Group shipping labels by printer and send them in batches of fifty.",
           "Where are shipping labels grouped by printer and sent in batches?"),
]  # fmt: skip
NAMED = NEEDLES[:20]  # asked by name
DESCRIBED = NEEDLES[20:]  # asked by what they do

_WORDS = [
    "order",
    "item",
    "parcel",
    "invoice",
    "customer",
    "payment",
    "refund",
    "carrier",
    "label",
    "stock",
    "product",
    "price",
    "tax",
    "discount",
    "cart",
    "session",
    "user",
    "account",
    "report",
    "ledger",
    "balance",
    "shipment",
    "warehouse",
    "bin",
    "supplier",
    "catalog",
    "coupon",
    "ticket",
    "queue",
    "batch",
    "record",
    "entry",
    "total",
    "amount",
    "weight",
    "size",
    "rate",
    "fee",
    "limit",
    "window",
    "period",
]
_VERBS = [
    "load",
    "save",
    "update",
    "check",
    "build",
    "apply",
    "find",
    "list",
    "count",
    "format",
    "parse",
    "render",
    "send",
    "read",
    "merge",
    "sort",
]
_SENTENCES = [
    "Return the {a} for the given {b}.",
    "Look up the {a} of every {b} in the store.",
    "Update the {a} and write the {b} back.",
    "Check that the {a} matches the {b} on record.",
    "Build a {a} summary from the {b} rows.",
    "Format the {a} for display next to its {b}.",
]


def _function(rng: random.Random, name: str, doc: str) -> str:
    a, b = rng.sample(_WORDS, 2)
    return (
        f"def {name}({a}s, {b}=None):\n"
        f'    """{doc}"""\n'
        f"    result = []\n"
        f"    for {a} in {a}s or []:\n"
        f"        if {b} is not None and {a}.get({b!r}) != {b}:\n"
        f"            continue\n"
        f"        result.append({a})\n"
        f"    return result\n\n\n"
    )


def _filler_module(rng: random.Random, name: str, functions: int) -> str:
    parts = [f'"""The {name} helpers."""\n\nfrom shop import core\n\n\n']
    for _ in range(functions):
        verb, a, b = rng.choice(_VERBS), *rng.sample(_WORDS, 2)
        doc = rng.choice(_SENTENCES).format(a=a, b=b)
        parts.append(_function(rng, f"{verb}_{a}_{b}_{rng.randrange(1000)}", doc))
    return "".join(parts)


def needle_files(filler_modules: int = 110, functions: int = 14) -> dict[str, str]:
    """The repository: filler modules that import ``core``, ``core`` itself, and one module per needle."""
    rng = random.Random(20261130)
    files = {"src/shop/core.py": _filler_module(rng, "core", functions)}
    for index in range(filler_modules):
        name = f"{rng.choice(_WORDS)}_{rng.choice(_VERBS)}_{index:03d}"
        files[f"src/shop/{name}.py"] = _filler_module(rng, name, functions)
    for needle in NEEDLES:
        module = _filler_module(rng, needle.path, functions // 2)
        files[needle.path] = module + _function(rng, needle.name, needle.doc)
    return files
