/**
 * Device state in protobuf (proto/vhost_ts/state.proto): what a device hands to its successor, through the
 * frontend in a live migration (SET_DEVICE_STATE_FD) or through a file across a planned restart (--state-file).
 */
import type { DeviceStateHooks, VhostUserDevice } from './device.js';
import { loadProto } from './proto-files.js';

const root = loadProto('state.proto');
const DeviceState = root.lookupType('vhost_ts.state.DeviceState');
const StateFile = root.lookupType('vhost_ts.state.StateFile');

export interface RingPosition {
  index: number;
  vringBase: number;
  packed: boolean;
  /** Chains the frontend's inflight region records as not yet completed (0 without a region). */
  inflight: number;
}

const asObject = { longs: Number, bytes: Uint8Array, oneofs: true, defaults: true } as const;

function stateObject(device: VhostUserDevice & { state: DeviceStateHooks }, queues: RingPosition[]): object {
  return { device: device.name, queues, [device.state.kind]: device.state.save() };
}

/** The device's state now, encoded. */
export function saveDeviceState(device: VhostUserDevice & { state: DeviceStateHooks }, queues: RingPosition[] = []): Uint8Array {
  return DeviceState.encode(DeviceState.fromObject(stateObject(device, queues))).finish();
}

/** Load an encoded state into the device; throws with the reason when it is not this kind of device's, or garbage. */
export function loadDeviceState(device: VhostUserDevice & { state: DeviceStateHooks }, bytes: Uint8Array): void {
  let msg: Record<string, unknown>;
  try {
    msg = DeviceState.toObject(DeviceState.decode(bytes), asObject) as Record<string, unknown>;
  } catch (e) {
    throw new Error(`the device state does not decode: ${(e as Error).message}`);
  }
  applyState(device, msg);
}

function applyState(device: VhostUserDevice & { state: DeviceStateHooks }, msg: Record<string, unknown>): void {
  if (msg.device !== device.name || msg.state !== device.state.kind) {
    throw new Error(`a state of a ${String(msg.device) || 'nameless'} device (${String(msg.state ?? 'no state')}) cannot go into ${device.name}`);
  }
  device.state.load(msg[device.state.kind] as object);
}

/** A --state-file for these devices, in order. */
export function saveStateFile(devices: (VhostUserDevice & { state: DeviceStateHooks })[]): Uint8Array {
  return StateFile.encode(StateFile.fromObject({ devices: devices.map((d) => stateObject(d, [])) })).finish();
}

/** Load a --state-file into these devices (the same ones, in the same order, as saved it). */
export function loadStateFile(devices: (VhostUserDevice & { state: DeviceStateHooks })[], bytes: Uint8Array): void {
  let file: { devices?: Record<string, unknown>[] };
  try {
    file = StateFile.toObject(StateFile.decode(bytes), asObject) as typeof file;
  } catch (e) {
    throw new Error(`the state file does not decode: ${(e as Error).message}`);
  }
  const states = file.devices ?? [];
  if (states.length !== devices.length) throw new Error(`the state file holds ${states.length} devices, this command serves ${devices.length}`);
  devices.forEach((d, i) => applyState(d, states[i]));
}
