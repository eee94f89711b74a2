// End to end: starts a real tinker server (the repository's Python one, embedded tiny
// Llama, no API keys) and trains a LoRA adapter through the Node client.
//
// Needs `make install` at the repository root first (for .venv); TINKER_PYTHON overrides
// the interpreter.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { TinkerClient, TinkerError, decodeTensor, float32Tensor, int32Tensor } from '../src/client.js';

const REPO_ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const PYTHON = process.env.TINKER_PYTHON || join(REPO_ROOT, '.venv', 'bin', 'python');
const MODEL = 'embedded/tiny-llama';
const BOS = 256; // the embedded model's vocabulary: bytes 0-255, then bos, eos, pad
const INVALID_ARGUMENT = 3;

/** Starts the server on a free port; resolves once it prints its listening line. */
async function startServer(dataDir) {
  const args = ['-m', 'tinker_server', '--port', '0', '--allow-unauthenticated', '--data-dir', dataDir];
  const server = spawn(PYTHON, args, { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = ''; // kept (the tail) to explain a failed start
  server.stderr.on('data', (chunk) => (stderr = (stderr + chunk).slice(-4000)));
  const address = new Promise((resolve, reject) => {
    createInterface({ input: server.stdout }).on('line', (line) => {
      const match = /^tinker-server listening on (\S+):(\d+)$/.exec(line.trim());
      if (match) resolve(`${match[1]}:${match[2]}`);
    });
    server.on('error', reject); // e.g. no such interpreter
    server.on('exit', (code, signal) =>
      reject(new Error(`server exited (${signal ?? code}) before listening:\n${stderr}`)),
    );
  });
  return { server, address };
}

async function stopServer(server) {
  if (server.exitCode !== null || server.signalCode !== null) return;
  const exited = once(server, 'exit');
  server.kill('SIGTERM');
  const timer = setTimeout(() => server.kill('SIGKILL'), 15_000); // it has a shutdown grace
  await exited;
  clearTimeout(timer);
}

/** One cross_entropy datum: next-token prediction over the UTF-8 bytes of `text`. */
function datum(text, { dropTarget = false } = {}) {
  const tokens = [BOS, ...Buffer.from(text, 'utf8')];
  const input = tokens.slice(0, -1);
  const targets = tokens.slice(1, dropTarget ? -1 : undefined);
  return {
    model_input: { tokens: int32Tensor(input) },
    loss_fn_inputs: { target_tokens: int32Tensor(targets), weights: float32Tensor(input.map(() => 1)) },
  };
}

/** Settles both promises of a queued call, noting which one settled first. */
async function settle({ acked, result }) {
  const order = [];
  const [ack, payload] = await Promise.all([
    acked.then((value) => (order.push('acked'), value)),
    result.then((value) => (order.push('result'), value)),
  ]);
  return { ack, payload, order };
}

describe('tinker server end to end', { timeout: 120_000 }, () => {
  let server;
  let dataDir;
  let client;
  let training;
  let lastSeq = 0;
  const TEXT = 'Q: What do bees make?\nA: Honey';

  // A failed run must not leave a server behind.
  const killOnExit = () => server?.kill('SIGKILL');
  process.on('exit', killOnExit);

  before(async () => {
    dataDir = await mkdtemp(join(tmpdir(), 'tinker-node-e2e-'));
    const started = await startServer(dataDir);
    server = started.server;
    client = new TinkerClient(await started.address);
  }, { timeout: 90_000 });

  after(async () => {
    client?.close();
    if (server) await stopServer(server);
    process.off('exit', killOnExit);
    if (dataDir) await rm(dataDir, { recursive: true, force: true });
  });

  test('capabilities list the embedded model', async () => {
    const capabilities = await client.getServerCapabilities();
    const model = capabilities.supported_models.find((m) => m.model_name === MODEL);
    assert.ok(model, `no ${MODEL} in ${JSON.stringify(capabilities.supported_models)}`);
    assert.equal(model.trainable, true);
    assert.equal(model.vocab_size, '259'); // int64: a decimal string
    assert.ok(capabilities.max_inflight_requests > 0);
  });

  test('creates a LoRA training client', async () => {
    const { supported_models } = await client.getServerCapabilities();
    const baseModel = supported_models.find((m) => m.model_name === MODEL).model_name;
    training = await client.createLoraTrainingClient(baseModel, {
      rank: 8, seed: 0, trainMlp: true, trainAttn: true, trainUnembed: true,
    });
    assert.match(training.modelId, /\S/);
    const info = await training.getInfo();
    assert.equal(info.model_name, MODEL);
    assert.equal(info.lora_rank, 8);
    // seed is a proto3 optional: 0 must be sent as set, not dropped as a default.
    assert.equal(info.lora_config.seed, '0');
  });

  test('15 steps at least halve the loss; acks come first, in seq order', async () => {
    const example = datum(TEXT);
    const length = example.model_input.tokens.shape[0];
    // Queue the whole run at once: requests of one model run in the order they were sent.
    const calls = [];
    for (let step = 0; step < 15; step++) {
      calls.push(training.forwardBackward([example], 'cross_entropy'));
      calls.push(training.optimStep({ learning_rate: 2e-3 }));
    }
    const settled = await Promise.all(calls.map(settle));

    for (const { order } of settled) assert.deepEqual(order, ['acked', 'result']);
    const seqs = settled.map(({ ack }) => ack.seq);
    for (let i = 1; i < seqs.length; i++) assert.ok(seqs[i] > seqs[i - 1], `seqs not increasing: ${seqs}`);
    lastSeq = seqs.at(-1);
    assert.equal(new Set(settled.map(({ ack }) => ack.futureId)).size, settled.length);

    const outputs = settled.filter((_, i) => i % 2 === 0).map(({ payload }) => payload);
    const losses = outputs.map((output) => output.metrics['loss:sum']);
    // With all weights 1, loss:sum is minus the sum of the target tokens' logprobs.
    const logprobs = decodeTensor(outputs[0].loss_fn_outputs[0].tensors.logprobs);
    assert.equal(logprobs.length, length);
    assert.ok(Math.abs(-logprobs.reduce((a, b) => a + b, 0) - losses[0]) < 1e-3 * losses[0]);

    assert.ok(losses.every(Number.isFinite), `losses: ${losses}`);
    assert.ok(losses.at(-1) < losses[0] / 2, `loss went ${losses[0]} -> ${losses.at(-1)}: ${losses}`);
  });

  test('a malformed request is rejected with INVALID_ARGUMENT; the next one succeeds', async () => {
    const bad = training.forwardBackward([datum(TEXT, { dropTarget: true })], 'cross_entropy');
    for (const promise of [bad.acked, bad.result]) {
      await assert.rejects(promise, (error) => {
        assert.ok(error instanceof TinkerError);
        assert.equal(error.code, INVALID_ARGUMENT);
        assert.match(error.message, /target_tokens/);
        return true;
      });
    }

    const { ack, payload } = await settle(training.forwardBackward([datum(TEXT)], 'cross_entropy'));
    assert.ok(ack.seq > lastSeq, `seq ${ack.seq} after ${lastSeq}`);
    assert.ok(Number.isFinite(payload.metrics['loss:sum']));
  });
});
