"""Every text an operator, an official or a device maker reads, in one catalogue.

Vietnamese first, English second. `say` renders "vi / en", the form the API, the logs and the
devices show; `CATALOGUE` is what the console reads to show one language. Keys are
"<concept>.<what>"; parameters are named in both languages' text where they belong.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Text(NamedTuple):
    vi: str
    en: str


CATALOGUE: dict[str, Text] = {
    # areas
    "area.unknown": Text("không có khu vực", "unknown area {area}"),
    # relay transports
    "server.shutting_down": Text("máy chủ đang dừng", "server is shutting down"),
    "limit.max": Text("tối đa", "max {limit}"),
    "listeners.server_full": Text("máy chủ đã đủ người nghe", "server listener limit reached"),
    "listeners.area_full": Text("khu vực đã đủ người nghe",
                                "listener limit reached for area {area}"),
    "icy.description": Text("Loa {area}: phát thanh cơ sở", "grassroots broadcast"),
    "relay.no_url": Text("thiếu địa chỉ tiếp sóng", "relay url is empty"),
    "url.unspecified": Text("địa chỉ không xác định", "unspecified address"),
    "url.loopback": Text("địa chỉ loopback", "loopback address"),
    "url.link_local": Text("địa chỉ link-local", "link-local address"),
    "url.broadcast": Text("địa chỉ quảng bá", "broadcast address"),
    "url.multicast_scheme": Text("multicast chỉ dùng cho rtp/udp",
                                 "multicast is for rtp and udp only"),
    "url.own_address": Text("địa chỉ của chính máy chủ", "one of this node's own addresses"),
    "url.unresolvable": Text("không phân giải được tên máy", "cannot resolve host {host}"),
    "url.address_refused": Text("không được mở địa chỉ {host} ({ip}): {why_vi}",
                                "address {host} ({ip}) is not allowed: {why_en} "
                                "(allow its network with [fetch] allow_networks)"),
    "url.malformed": Text("địa chỉ không hợp lệ", "malformed url"),
    "url.scheme": Text("giao thức không được phép", "scheme must be one of {schemes}"),
    "url.no_host": Text("địa chỉ thiếu tên máy", "url has no host"),
    "webrtc.offer_not_sdp": Text("SDP không hợp lệ", "malformed SDP: not a session description"),
    "webrtc.offer_malformed": Text("SDP không hợp lệ", "malformed SDP: {error}"),
    "webrtc.offer_no_audio": Text("SDP không có âm thanh", "offer has no audio m-line"),
    "webrtc.offer_many_audio": Text("SDP có nhiều luồng âm thanh",
                                    "offer has more than one audio m-line"),
    "webrtc.offer_direction": Text("hướng luồng không phù hợp",
                                   "audio direction must be {wanted}, got {direction}"),
    "webrtc.offer_no_ice": Text("SDP thiếu thông tin ICE", "offer lacks ice-ufrag/ice-pwd"),
    "webrtc.offer_no_fingerprint": Text("SDP thiếu dấu vân tay DTLS",
                                        "offer lacks a DTLS fingerprint"),
    "webrtc.offer_no_opus": Text("chỉ hỗ trợ Opus", "the offer must include Opus (audio/opus)"),
    "webrtc.cannot_negotiate": Text("không thương lượng được",
                                    "cannot negotiate the offer: {error}"),
    "webrtc.too_many_listeners": Text("quá số người nghe", "too many WebRTC listeners ({limit})"),
    "webrtc.too_many_area_listeners": Text("quá số người nghe của khu vực",
                                           "too many WebRTC listeners in {area} ({limit})"),
    "webrtc.too_many_inputs": Text("quá số nguồn trực tiếp", "too many live inputs ({limit})"),
    "webrtc.workers_restarting": Text("bộ phát WebRTC đang khởi động lại",
                                      "WebRTC workers restarting"),
    "webrtc.worker_silent": Text("bộ phát WebRTC không trả lời", "WebRTC worker did not answer"),
    "sdp.too_large": Text("SDP quá lớn", "SDP larger than {limit} bytes"),
    "sdp.bad_encoding": Text("SDP không phải UTF-8", "SDP is not UTF-8"),
    "sdp.empty": Text("SDP rỗng", "empty SDP"),
    "sdp.too_many_lines": Text("SDP quá nhiều dòng", "SDP has more than {limit} lines"),
    "sdp.bad_line": Text("dòng {no} không đúng dạng x=...", "line {no} is not 'x=value': {text!r}"),
    "sdp.no_version": Text("SDP phải bắt đầu bằng v=0", "SDP must start with v=0"),
    "sdp.bad_origin": Text("dòng {no}: o= cần 6 trường",
                           "line {no}: o= needs "
                           "'username sess-id sess-version IN addrtype address'"),
    "sdp.bad_origin_numbers": Text("dòng {no}: o= sess-id/version phải là số",
                                   "line {no}: o= session id and version must be numbers"),
    "sdp.bad_timing": Text("dòng {no}: t= cần 2 số", "line {no}: t= needs 'start stop'"),
    "sdp.empty_attribute": Text("dòng {no}: thuộc tính rỗng", "line {no}: empty attribute"),
    "sdp.bad_fmtp": Text("dòng {no}: fmtp cần payload type",
                         "line {no}: fmtp needs a payload type"),
    "sdp.missing_line": Text("thiếu dòng {kind}=", "missing {kind}= line"),
    "sdp.no_connection": Text("thiếu địa chỉ c= cho m={media}", "no c= address for m={media}"),
    "sdp.bad_connection": Text("dòng {no}: c= cần 'IN IP4 địa-chỉ'",
                               "line {no}: c= needs 'IN IP4 address'"),
    "sdp.bad_ttl": Text("dòng {no}: TTL không hợp lệ", "line {no}: bad TTL"),
    "sdp.ttl_range": Text("dòng {no}: TTL ngoài 0-255", "line {no}: TTL outside 0-255"),
    "sdp.no_address": Text("dòng {no}: thiếu địa chỉ", "line {no}: missing address"),
    "sdp.bad_media": Text("dòng {no}: m= cần 'media port proto fmt...'",
                          "line {no}: m= needs 'media port proto fmt ...'"),
    "sdp.bad_port": Text("dòng {no}: cổng không hợp lệ", "line {no}: bad port {port!r}"),
    "sdp.port_range": Text("dòng {no}: cổng ngoài 0-65535", "line {no}: port outside 0-65535"),
    "sdp.bad_rtpmap": Text("dòng {no}: rtpmap cần 'pt tên/clock[/kênh]'",
                           "line {no}: rtpmap needs 'pt encoding/clock[/channels]'"),
    "rtp.packet_short": Text("gói RTP quá ngắn", "RTP packet shorter than 12 bytes"),
    "rtp.packet_bad_version": Text("không phải RTP phiên bản 2", "not RTP version 2"),
    "rtp.packet_bad_padding": Text("phần đệm RTP sai", "bad RTP padding"),
    "rtp.packet_truncated_extension": Text("phần mở rộng RTP cụt",
                                           "truncated RTP header extension"),
    "rtp.packet_truncated_header": Text("tiêu đề RTP cụt", "truncated RTP header"),
    "rtp.pool_exhausted": Text("hết nhóm multicast", "multicast pool exhausted ({blocks} areas)"),
    "rtp.codecs_available": Text("có", "available: {codecs}"),
    "rtp.codec_not_served": Text("không có mã hóa {codec}",
                                 "codec {codec} is not served ({available})"),
    "rtp.area_no_stream": Text("khu vực {area} chưa có luồng RTP (hết nhóm multicast?)",
                               "no RTP stream for area {area} (multicast pool full?)"),
    "rtp.receiver_bad_host": Text("địa chỉ nhận phải là IPv4",
                                  "receiver host must be an IPv4 address: {host!r}"),
    "rtp.receiver_unusable": Text("địa chỉ nhận không dùng được",
                                  "unusable receiver address: {ip}"),
    "rtp.receiver_port": Text("cổng nhận cần 1-65534", "receiver port must be 1-65534: {port!r}"),
    "rtp.too_many_receivers": Text("quá nhiều máy nhận",
                                   "too many receivers for {area} {codec} ({limit})"),
    "rtp_config.pool_size_auto": Text("[rtp] pool_size: cần {low}-{high} khi group_base trống",
                                      "must be {low}-{high} when group_base is empty"),
    "rtp_config.pool_size_min": Text("[rtp] pool_size: cần ít nhất {low}",
                                     "must be at least {low}"),
    "rtp_config.bad_address": Text("[rtp] {setting}: địa chỉ IPv4 không hợp lệ",
                                "not an IPv4 address: {value!r}"),
    "rtp_config.not_multicast": Text("[rtp] {setting}: {address} không phải địa chỉ multicast "
                                     "(224.0.0.0/4)",
                                     "is not a multicast address"),
    "rtp_config.past_multicast_range": Text("[rtp] group_base + pool_size vượt quá 239.255.255.255",
                                            "runs past the multicast range ({base} + {size})"),
    "rtp_config.control_block": Text("[rtp] group_base: {base} thuộc dải điều khiển cục bộ "
                                     "224.0.0.0/24",
                                     "is in the link-local control block 224.0.0.0/24"),
    "rtp_config.port": Text("[rtp] port: cần 1-65534 (RTCP dùng port+1)",
                            "must be 1-65534 (RTCP uses port+1), got {value}"),
    "rtp_config.out_of_range": Text("[rtp] {setting}: cần {low}-{high}",
                                    "must be {low}-{high}, got {value}"),
    "rtp_config.positive": Text("[rtp] {setting}: cần > 0", "must be > 0"),
    "rtp_config.codecs": Text("[rtp] codecs: cần danh sách không trùng trong {formats}",
                              "must be distinct names from {formats}, got {value!r}"),
    "rtp_config.interface": Text("[rtp] interface: cần địa chỉ IPv4 của giao diện",
                                 "must be the IPv4 address of an interface, got {value!r}"),
    "rtp_config.interface_not_local": Text("[rtp] interface: {iface} không phải địa chỉ "
                                           "của máy này",
                                           "is not an address of this host ({error})"),
    "rtp_config.sap_bandwidth": Text("[rtp] sap_bandwidth: cần >= 100 bit/s",
                                     "must be >= 100 bit/s"),
    "rtp_config.max_payload": Text("[rtp] max_payload: cần 100-8000 byte",
                                   "must be 100-8000 bytes"),
    # devices (relay/devices, relay/agent)
    "rtcp.packet_short": Text("gói RTCP quá ngắn", "RTCP packet too short"),
    "rtcp.packet_bad_version": Text("không phải RTCP phiên bản 2", "not RTCP version 2"),
    "rtcp.packet_truncated": Text("gói RTCP cụt", "truncated RTCP packet"),
    # (end devices)

    # streamer (domain: areas, programmes, schedule, emergency, state)
    # (end streamer)

    # web (api, streams, monitor, board, auth, config, cli)
    # (end web)
}


def say(key: str, **params: Any) -> str:
    """The bilingual text of `key` with `params` filled in ("vi / en")."""
    text = CATALOGUE[key]
    return f"{text.vi.format(**params)} / {text.en.format(**params)}"
