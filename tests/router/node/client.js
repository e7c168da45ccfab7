#!/usr/bin/env node
// A Node.js client for nanoserve, to check the gRPC contract from a second language: it loads
// proto/nanoserve.proto at run time (no generated code), streams one Generate call, then asks the
// standard health service for the server's status.
//
// Usage: node client.js TARGET PROMPT_JSON MAX_TOKENS [PARAMS_JSON]
//   PROMPT_JSON  a JSON string (text), array of integers (token ids) or array of
//                {"role", "content"} objects (chat messages)
//   PARAMS_JSON  more SamplingParams fields as a JSON object, e.g. '{"temperature": 0}'
// Prints one JSON line per Generate chunk, {"chunk": {...}}, then {"health": "<status>"}.
// On a gRPC error prints "error: <CODE>: <details>" to stderr and exits 1.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const NANOSERVE_PROTO = path.resolve(__dirname, "..", "..", "..", "proto", "nanoserve.proto");
const HEALTH_PROTO = path.join(__dirname, "health.proto");
// Field names as in the .proto, int64 as JS numbers (token ids fit), enums by name, and unset
// fields filled with their defaults so every chunk prints the same keys.
const LOADER_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };
const DEADLINE_MS = 30_000;

function loadPackage(protoFile) {
  return grpc.loadPackageDefinition(protoLoader.loadSync(protoFile, LOADER_OPTIONS));
}

function promptField(prompt) {
  if (typeof prompt === "string") return { text: prompt };
  if (Array.isArray(prompt) && prompt.every(Number.isInteger)) return { token_ids: { ids: prompt } };
  if (Array.isArray(prompt)) return { chat: { messages: prompt } };
  throw new TypeError("PROMPT_JSON must be a string, an array of token ids or an array of chat messages");
}

function deadline() {
  return new Date(Date.now() + DEADLINE_MS);
}

function streamGenerate(client, request) {
  return new Promise((resolve, reject) => {
    const call = client.Generate(request, { deadline: deadline() });
    call.on("data", (chunk) => console.log(JSON.stringify({ chunk })));
    call.on("error", reject);
    call.on("end", resolve);
  });
}

function checkHealth(client) {
  return new Promise((resolve, reject) => {
    client.Check({ service: "" }, { deadline: deadline() }, (error, response) =>
      error ? reject(error) : resolve(response.status),
    );
  });
}

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) ?? String(code);
}

async function main(argv) {
  if (argv.length < 3 || argv.length > 4) {
    console.error("usage: node client.js TARGET PROMPT_JSON MAX_TOKENS [PARAMS_JSON]");
    return 2;
  }
  const [target, promptJson, maxTokens, paramsJson = "{}"] = argv;
  const params = { ...JSON.parse(paramsJson), max_tokens: Number(maxTokens) };
  const request = { ...promptField(JSON.parse(promptJson)), params };

  const credentials = grpc.credentials.createInsecure();
  const nanoserve = new (loadPackage(NANOSERVE_PROTO).nanoserve.v1.NanoServe)(target, credentials);
  const health = new (loadPackage(HEALTH_PROTO).grpc.health.v1.Health)(target, credentials);
  try {
    await streamGenerate(nanoserve, request);
    console.log(JSON.stringify({ health: await checkHealth(health) }));
    return 0;
  } finally {
    nanoserve.close();
    health.close();
  }
}

main(process.argv.slice(2)).then(
  (exitCode) => {
    process.exitCode = exitCode;
  },
  (error) => {
    const message = error.code === undefined ? error.message : `${statusName(error.code)}: ${error.details}`;
    console.error(`error: ${message}`);
    process.exitCode = 1;
  },
);
