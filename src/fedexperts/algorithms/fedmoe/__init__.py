"""FedMoE (Mei et al., "FedMoE: Personalized Federated Learning via Heterogeneous Mixture of Experts",
arXiv 2408.11304) and its randomMoE baseline: per-client sub-MoEs under memory budgets.

FedMoE fine-tunes in two stages. Stage 1 profiles which experts each client's data activates and
searches, heuristically, for a sub-MoE per client that fits its memory; stage 2 trains those
heterogeneous sub-MoEs federatedly, aggregates them module by module (an expert is averaged only
among the clients that hold it), and progressively adjusts each client's structure with experts
recommended from clients whose activation patterns look alike.

Only the paper's abstract and introduction could be read (the method sections were not
available), so the concrete rules are this project's reading, each stated where it is
implemented: the coverage-threshold search of :func:`~.search.choose_sub_moe`, the data-size-weighted
estimate of :func:`~.activation.estimate_activation`, the holder-only example-weighted mean of
:func:`~.aggregate.modular_average`, the cosine-similarity neighbours of :func:`~.recommend.recommend`
and the patience / trial / revert-and-freeze rule of :class:`~.recommend.RecommendationState`.

**The modules.** Model-free (plain tensors, index lists and JSON; tested without a model):
:mod:`.layout` (the model as names and numbers), :mod:`.activation` (``p`` vectors and their
estimate), :mod:`.search` (stage 1), :mod:`.aggregate` (modular average), :mod:`.recommend`
(stage 2), :mod:`.records` (what the server knows of a client, and its checkpoint form) and
:mod:`.schedule` (budgets, plans, and what the server does with replies). :mod:`.views` is the
one module that touches models; :mod:`.algorithm` holds :class:`FedMoE` (and :mod:`.random_moe` its
baseline), which turn all of it into payloads; :mod:`.config` their settings. Expert indices are always
*global* (indices into the full model's layer).

**What is trained and sent.** The global state is the dense shared part (``scope``, attention LoRA
by default) plus every *expert-row* tensor: each MoE layer's fused expert tensors and its router's
per-expert rows (weight, and bias where the router has one). A client in stage 2 holds a sub-MoE
(sorted global expert indices per layer); its downlink is the dense tensors plus only the rows of
the experts it holds, under the full tensors' names, with the held indices in the metadata; its
uplink is the same slice after training. The server averages the dense tensors over every reply
and each expert row over the replies that hold it (:func:`~.aggregate.aggregate_fedmoe`), then
applies the server optimizer; a row no sampled client held keeps its value under every server rule
(its optimizer moments still decay).

**Stage 1, before any budget client trains** (every round stays downlink -> client step -> uplink
-> aggregate). A client's memory budget is its entry of ``budgets``, else the full model's bytes for
the ``full_budget_clients``, else ``budget_fraction`` of the full model's bytes. What a budget holds
is ``budget_counts``: ``weights`` (frozen tensors in the checkpoint's dtype, trained ones, the held
experts' rows and the shared scope, as float32 masters) or ``training`` (also a float32 gradient and
two AdamW moments per trained parameter: the paper's M is a device's memory).

* A client whose budget holds the full model *profiles*: ``warmup_rounds`` (default 5, the paper's
  "about 5") of LoRA on the full MoE with the pretrained experts frozen (the dense part only
  travels), then one measuring round: it measures the activation ``p`` of every expert
  (``RoutingRecorder`` over its first ``measure_examples`` training rows, before it trains) and
  sends ``p`` with its reply. The server then chooses its sub-MoE with
  :func:`~.search.choose_sub_moe`; since the whole model fits, that is the whole model.
* A client whose budget is smaller cannot run the full model, so its ``p`` is estimated
  (:func:`~.activation.estimate_activation`) from the measured ``p`` of the clients of its category
  (its majority category, reported with every reply), weighted by their data, else of every
  measured client, else the uniform prior. With ``wait_for_stage_1`` (the default: the paper's
  order) such a client sampled before every profiling client has measured *sits the round out*
  (it is sent nothing and trains nothing; :attr:`~fedexperts.interface.ClientContext.idle`), so
  it starts from the finished estimate. ``wait_for_stage_1 = false`` (the paper does not say what
  such a client does) trains provisional sub-MoEs instead, re-chosen when a better estimate exists
  (prior -> every measured client -> its category) until the recommendation has changed them.

With every budget below the full model no client can measure, stage 1 is empty and every sub-MoE
comes from the uniform prior; a warning says so.

**Stage 2 recommendation, on validation rows.** The score is the client's ``val_rouge_l``: ROUGE-L
on the validation rows it holds out of its training data (``data.validation_fraction``, 0.1 by
default for FedMoE and randomMoE), measured before it trains. Test rows are only ever reported.
After ``patience`` scores without improvement the server proposes :func:`~.recommend.recommend`'s
structure: neighbours by cosine similarity of the clients' stage-1 ``p`` (clients with only the
prior take no part, and a client and those whose ``p`` is a copy of its own, estimated from it or
from the same clients, are not each other's neighbours); ``n`` = the neighbours' mean total expert
count minus the client's; the ``n`` best (or ``-n`` worst) experts by the similarity-weighted
``p`` ranked across all layers are added (dropped). The proposal is shrunk if needed to the
client's budget by dropping the added experts its own ``p`` ranks lowest and sent from the next
round; the next score keeps it or reverts to the old one for good
(:class:`~.recommend.RecommendationState`). A trial still unjudged after the last round is
reverted before the final evaluation (:meth:`~.algorithm.FedMoE.finish`).

**Communication** is recorded as sent (exact wire bytes) and, in each client's ``report``, as the
paper counts it: ``paper_bytes``, the whole sub-MoE in float32, per direction and round.

**The client model.** A client can hold only its sub-MoE, as the paper's memory-constrained
devices do: :meth:`~.algorithm.FedMoE.client_experts` names the experts a downlink needs (every
one while profiling), the runtime loads just those from the checkpoint
(:func:`fedexperts.models.load_sub_moe`, ``federation.client_model = "sub-moe"``, always on a Flower
node) and :meth:`~fedexperts.algorithms.base.BaseAlgorithm.prepare_client_model` gives it the base's
LoRA, roles and float32 masters; ``setup_client`` then fills that model itself. In the default
``"shared"`` mode one base model is shared by every client of a process, and a stage-2 client
trains a pruned *view* of it: ``copy.deepcopy`` with a memo that maps every parameter, buffer and
tensor attribute to itself copies only the module objects and config, then ``select_experts``
replaces the view's expert-row tensors by sliced copies (it assigns new tensors to the view's own
modules and never writes into the old ones), which are then filled with the received rows
(:func:`~.views.sub_moe_view`). So attention, embeddings, norms and the LoRA tensors are the base
model's own objects (the received dense tensors are loaded into them, as FedAvg loads them into
the base model), while the base model's experts, routers and config are never touched: profiling
always sees the pretrained experts. What a client step knows (its phase, held experts, measured
``p`` and category) is in its :class:`~.algorithm.FedMoEContext`, never on the shared object.

**randomMoE** (:class:`~.random_moe.RandomMoE`): the same stages and validation split, but each sub-MoE
is a random choice of exactly the sizes FedMoE's search picks, drawn per client from
``(federation.seed, algorithm.fedmoe.seed, client)`` (so every federation seed draws its own), and
there is no recommendation.

All server knowledge (each client's ``p`` and its source, structure, category, example count,
profiling count and recommendation state) is in ``FedMoE.server_state()``, as tensors and JSON.

This package module imports nothing, so reading :mod:`.config` (the registry does) does not load torch.
"""
