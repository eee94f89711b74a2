// A small Node.js client for the Tinker gRPC service.
//
// The gRPC stubs are generated at runtime from the repository's protos (no build step), so
// request and response objects use the proto field names as written (snake_case):
// `model_input`, `loss_fn_inputs`, `learning_rate`, ... Enums are their names as strings
// (e.g. "D_TYPE_INT32") and 64-bit integers are decimal strings.
//
// Every queued operation (create_model, forward_backward, optim_step) travels on one
// bidirectional `Session` stream per TinkerClient. The server answers each request first
// with an Ack (validated, queued, ordered) and later with a Result; a request it rejects
// gets a Result carrying an error and no Ack. Each call here therefore returns
// `{ acked, result }`: two promises that settle on those two messages.

import { randomUUID } from 'node:crypto';
import { endianness } from 'node:os';
import { fileURLToPath } from 'node:url';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const PROTOS_DIR = fileURLToPath(new URL('../../../protos', import.meta.url));

const packageDefinition = protoLoader.loadSync(
  ['tinker_rpc/v1/service.proto', 'tinker_rpc/v1/runs.proto'],
  { includeDirs: [PROTOS_DIR], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
);
const { TinkerService } = grpc.loadPackageDefinition(packageDefinition).tinker_rpc.v1;

// The server's default limit is 256 MiB; grpc-js would otherwise refuse replies over 4 MiB.
const MAX_MESSAGE_BYTES = 256 << 20;

// Requests sent but not yet answered on the stream. The server refuses more than its
// max_inflight_requests (512 by default) with RESOURCE_EXHAUSTED, so stay well below it
// and hold the rest back in order.
const DEFAULT_MAX_INFLIGHT = 64;

/** A failed request: `code` is the gRPC status number (3 INVALID_ARGUMENT, 5 NOT_FOUND, ...). */
export class TinkerError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'TinkerError';
    this.code = code;
  }
}

// TensorData carries raw little-endian bytes; typed arrays use the host's byte order.
if (endianness() !== 'LE') throw new Error('tinker-grpc-client needs a little-endian host');

function tensor(dtype, TypedArray, values) {
  const array = TypedArray.from(values);
  return { dtype, shape: [array.length], data: Buffer.from(array.buffer, array.byteOffset, array.byteLength) };
}

/** A 1-D D_TYPE_INT32 TensorData (token ids, target tokens). */
export const int32Tensor = (values) => tensor('D_TYPE_INT32', Int32Array, values);

/** A 1-D D_TYPE_FLOAT32 TensorData (weights, advantages). */
export const float32Tensor = (values) => tensor('D_TYPE_FLOAT32', Float32Array, values);

/** The elements of a TensorData (e.g. a result's "logprobs") as a typed array. */
export function decodeTensor({ dtype, data }) {
  const bytes = Uint8Array.from(data); // copy: the typed array needs an aligned buffer
  const TypedArray = { D_TYPE_INT32: Int32Array, D_TYPE_INT64: BigInt64Array, D_TYPE_FLOAT32: Float32Array }[dtype];
  if (!TypedArray) throw new Error(`unknown dtype ${dtype}`);
  return new TypedArray(bytes.buffer, 0, bytes.byteLength / TypedArray.BYTES_PER_ELEMENT);
}

/** A connection to a Tinker server. Call close() when done. */
export class TinkerClient {
  #stub;
  #metadata = new grpc.Metadata();
  #maxInflight;
  #stream = null; // the Session call, opened on the first queued request
  #pending = new Map(); // request_id -> {acked, resolve/reject functions} of sent requests
  #backlog = []; // [request, entry] waiting for room in the in-flight window
  #nextId = 1;
  #closed = false;

  /**
   * @param {string} address host:port of the server, e.g. "127.0.0.1:50051".
   * @param {object} [options]
   * @param {string} [options.apiKey] sent as `authorization: Bearer <key>` on every call.
   * @param {grpc.ChannelCredentials} [options.credentials] e.g. grpc.credentials.createSsl();
   *   plaintext by default.
   * @param {number} [options.maxInflight] requests sent but unanswered at once (default 64);
   *   keep it below the server's max_inflight_requests.
   */
  constructor(address, { apiKey, credentials, maxInflight = DEFAULT_MAX_INFLIGHT } = {}) {
    this.#stub = new TinkerService(address, credentials ?? grpc.credentials.createInsecure(), {
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    });
    // Per-call metadata rather than call credentials: grpc-js refuses those on plaintext.
    if (apiKey) this.#metadata.set('authorization', `Bearer ${apiKey}`);
    this.#maxInflight = maxInflight;
  }

  /** The served base models and the server's limits (GetServerCapabilitiesResponse). */
  getServerCapabilities() {
    return this.#unary('GetServerCapabilities', {});
  }

  /** Describes one training run (GetInfoResponse). */
  getInfo(modelId) {
    return this.#unary('GetInfo', { model_id: modelId });
  }

  /**
   * Creates a LoRA training run on `baseModel` and waits until it exists.
   * Defaults match the Python SDK: rank 32, every train flag on, seed chosen by the server.
   * @returns {Promise<TrainingClient>}
   */
  async createLoraTrainingClient(
    baseModel,
    { rank = 32, seed, trainMlp = true, trainAttn = true, trainUnembed = true } = {},
  ) {
    const lora_config = { rank, train_mlp: trainMlp, train_attn: trainAttn, train_unembed: trainUnembed };
    // `seed` is a proto3 `optional`: leave it out (not 0) to let the server draw one.
    if (seed !== undefined && seed !== null) lora_config.seed = seed;
    const { result } = this.submit({ create_model: { base_model: baseModel, lora_config } });
    const { model_id } = await result;
    return new TrainingClient(this, model_id);
  }

  /**
   * Queues one SessionRequest, given as its operation (e.g. `{optim_step: {...}}`) plus
   * `model_id` where it applies. The request_id and idempotency_key are filled in here.
   * @returns {{acked: Promise<{futureId: string, seq: number}>, result: Promise<object>}}
   *   `result` resolves to the Result's payload (e.g. its `forward_backward` field). A
   *   rejected request or a failed one rejects with a TinkerError (and `acked` too if no
   *   Ack came).
   */
  submit(request) {
    const entry = { ackReceived: false };
    const acked = new Promise((resolve, reject) => Object.assign(entry, { ackResolve: resolve, ackReject: reject }));
    const result = new Promise((resolve, reject) => Object.assign(entry, { resolve, reject }));
    // Callers often await only `result`; don't let an unobserved `acked` rejection crash
    // the process (awaiting `acked` still throws).
    acked.catch(() => {});
    const full = { ...request, request_id: `r${this.#nextId++}`, idempotency_key: randomUUID() };
    if (this.#closed) {
      this.#settle(entry, new TinkerError(grpc.status.CANCELLED, 'client is closed'));
    } else {
      this.#backlog.push([full, entry]);
      this.#pump();
    }
    return { acked, result };
  }

  /** Ends the session stream and the channel; unanswered requests reject with CANCELLED. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    this.#failAll(new TinkerError(grpc.status.CANCELLED, 'client closed'));
    this.#stream?.cancel();
    this.#stream = null;
    this.#stub.close();
  }

  #unary(method, request) {
    return new Promise((resolve, reject) =>
      this.#stub[method](request, this.#metadata, (error, response) => (error ? reject(grpcError(error)) : resolve(response))),
    );
  }

  // Sends from the backlog, in order, while the in-flight window has room.
  #pump() {
    while (this.#backlog.length > 0 && this.#pending.size < this.#maxInflight) {
      const [request, entry] = this.#backlog.shift();
      this.#pending.set(request.request_id, entry);
      this.#openStream().write(request);
    }
  }

  #openStream() {
    if (this.#stream) return this.#stream;
    const stream = this.#stub.Session(this.#metadata);
    stream.on('data', (response) => this.#onResponse(response));
    // The stream ending (with an error or not) leaves its unanswered requests without a
    // reply: fail them. A later request opens a new stream.
    const onEnd = (error) => {
      if (this.#stream !== stream) return;
      this.#stream = null;
      this.#failPending(error ? grpcError(error) : new TinkerError(grpc.status.UNAVAILABLE, 'session stream ended'));
      this.#pump();
    };
    stream.on('error', onEnd);
    stream.on('end', () => onEnd());
    this.#stream = stream;
    return stream;
  }

  #onResponse({ request_id, response, ack, result }) {
    const entry = this.#pending.get(request_id);
    if (!entry) return; // a reply to a request already failed locally
    if (response === 'ack') {
      entry.ackReceived = true;
      entry.ackResolve({ futureId: ack.future_id, seq: Number(ack.seq) });
      return;
    }
    this.#pending.delete(request_id);
    if (result.outcome === 'error') {
      this.#settle(entry, new TinkerError(result.error.code, result.error.message));
    } else {
      entry.resolve(result[result.outcome] ?? {});
    }
    this.#pump();
  }

  // Rejects `result`, and `acked` too unless an Ack already resolved it.
  #settle(entry, error) {
    if (!entry.ackReceived) entry.ackReject(error);
    entry.reject(error);
  }

  #failPending(error) {
    for (const entry of this.#pending.values()) this.#settle(entry, error);
    this.#pending.clear();
  }

  #failAll(error) {
    this.#failPending(error);
    for (const [, entry] of this.#backlog.splice(0)) this.#settle(entry, error);
  }
}

/** Queues training operations on one LoRA training run; see TinkerClient.submit(). */
export class TrainingClient {
  /** @param {TinkerClient} client @param {string} modelId */
  constructor(client, modelId) {
    this.client = client;
    this.modelId = modelId;
  }

  /**
   * Loss, per-token logprobs, and gradients accumulated until the next optimStep.
   * @param {object[]} data Datum objects: `{model_input: {tokens}, loss_fn_inputs: {...}}`
   *   with TensorData values (see int32Tensor / float32Tensor).
   * @param {string} [lossFn] e.g. "cross_entropy".
   * @param {Object<string, number>} [lossFnConfig] the loss's hyper-parameters.
   * @returns {{acked: Promise, result: Promise<object>}} result: ForwardBackwardOutput,
   *   with `metrics["loss:sum"]` and one `loss_fn_outputs` entry per datum.
   */
  forwardBackward(data, lossFn = 'cross_entropy', lossFnConfig = {}) {
    return this.#submit({ forward_backward: { data, loss_fn: lossFn, loss_fn_config: lossFnConfig } });
  }

  /** Like forwardBackward, without gradients. */
  forward(data, lossFn = 'cross_entropy', lossFnConfig = {}) {
    return this.#submit({ forward: { data, loss_fn: lossFn, loss_fn_config: lossFnConfig } });
  }

  /**
   * One AdamW step on the accumulated gradients.
   * @param {object} adamParams AdamParams fields by their proto names; `learning_rate` is
   *   the one to set, the others default to beta1 0.9, beta2 0.95, eps 1e-12, no weight
   *   decay, no gradient clipping.
   * @returns {{acked: Promise, result: Promise<object>}} result: OptimStepResult (`metrics`).
   */
  optimStep(adamParams) {
    const adam_params = { beta1: 0.9, beta2: 0.95, eps: 1e-12, weight_decay: 0, grad_clip_norm: 0, ...adamParams };
    return this.#submit({ optim_step: { adam_params } });
  }

  /** Describes this training run (GetInfoResponse). */
  getInfo() {
    return this.client.getInfo(this.modelId);
  }

  #submit(operation) {
    return this.client.submit({ model_id: this.modelId, ...operation });
  }
}

function grpcError(error) {
  return new TinkerError(error.code ?? grpc.status.UNKNOWN, error.details || error.message);
}
