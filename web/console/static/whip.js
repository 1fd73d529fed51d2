// Going live from the browser microphone over WHIP (POST /whip/A,B?class=&title=): the session
// cookie plus the CSRF header authenticate it, so the page never holds a bearer token. The level
// meter reads the microphone itself (Web Audio AnalyserNode, once per animation frame).
import { session, ApiFailure } from "./api.js";

const ICE_WAIT_MS = 2000; // all candidates are local (no STUN): gathering ends well before

function iceComplete(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") resolve();
    });
    setTimeout(resolve, ICE_WAIT_MS); // go with what was gathered so far
  });
}

// The microphone's peak level (0..1) to `onLevel` every animation frame; returns the stopper.
function levelMeter(stream, onLevel) {
  const ctx = new AudioContext();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 1024;
  ctx.createMediaStreamSource(stream).connect(analyser);
  ctx.resume().catch(() => {});
  const samples = new Float32Array(analyser.fftSize);
  let frame = 0;
  const read = () => {
    analyser.getFloatTimeDomainData(samples);
    let peak = 0;
    for (const v of samples) peak = Math.max(peak, Math.abs(v));
    onLevel(peak);
    frame = requestAnimationFrame(read);
  };
  read();
  return () => { cancelAnimationFrame(frame); ctx.close().catch(() => {}); };
}

async function refusal(r) {
  const body = await r.json().catch(() => ({}));
  if (r.status === 401) session.value = null; // the session ended: back to login
  return new ApiFailure(r.status, body);
}

// Opens the microphone and publishes it; resolves once the broadcast is on air with
// {broadcast, stop()}. `onEnd` is called once if the connection drops.
export async function goLive({ targets, klass, title, onLevel, onEnd }) {
  const mic = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
  });
  const pc = new RTCPeerConnection({ iceServers: [] });
  let stopMeter = () => {};
  let location = null;
  let over = false;
  const close = () => {
    if (over) return false;
    over = true;
    stopMeter();
    pc.close();
    mic.getTracks().forEach((track) => track.stop());
    return true;
  };
  try {
    for (const track of mic.getAudioTracks()) pc.addTransceiver(track, { direction: "sendonly" });
    await pc.setLocalDescription(await pc.createOffer());
    await iceComplete(pc);
    const query = new URLSearchParams({ class: klass, title });
    const r = await fetch(`/whip/${targets.map(encodeURIComponent).join(",")}?${query}`, {
      method: "POST", credentials: "same-origin", body: pc.localDescription.sdp,
      headers: { "Content-Type": "application/sdp", "X-CSRF-Token": session.value.csrf },
    });
    if (r.status !== 201) throw await refusal(r);
    location = r.headers.get("Location");
    const broadcast = r.headers.get("Loa-Broadcast");
    await pc.setRemoteDescription({ type: "answer", sdp: await r.text() });
    stopMeter = levelMeter(mic, onLevel);
    pc.addEventListener("connectionstatechange", () => {
      if (["failed", "closed"].includes(pc.connectionState) && close()) onEnd();
    });
    const stop = async () => {
      if (!close()) return;
      await fetch(location, { method: "DELETE", credentials: "same-origin",
                              headers: { "X-CSRF-Token": session.value?.csrf || "" } });
    };
    return { broadcast, stop, close };
  } catch (e) {
    close();
    throw e;
  }
}
