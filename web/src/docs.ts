// The API reference at `/docs`: Swagger UI, bundled into the binary (no
// CDN), rendering the server's own /openapi.json. Requests made with "Try it
// out" go to this server only; when this tab holds an API key (stored by the
// playground or the console) they carry it as a Bearer header, unless one
// was entered in Swagger UI's own Authorize dialog.

import SwaggerUIBundle from 'swagger-ui-dist/swagger-ui-es-bundle.js';
import 'swagger-ui-dist/swagger-ui.css';
import './docs.css';
import { currentKey } from './storage';

SwaggerUIBundle({
  url: '/openapi.json',
  dom_id: '#swagger',
  // The default validator badge would call an outside service.
  validatorUrl: null,
  deepLinking: true,
  requestInterceptor: (req: { url: string; headers: Record<string, string> }) => {
    const key = currentKey();
    const sameOrigin = new URL(req.url, location.href).origin === location.origin;
    if (key && sameOrigin && !req.headers.Authorization) req.headers.Authorization = `Bearer ${key}`;
    return req;
  },
});
